"""Annotation loaders on hand-written excerpts in the exact VinDr-Mammo format, and a generic box CSV."""

from __future__ import annotations

import pytest

from napari_mammo_sae import annotations as ann
from napari_mammo_sae.errors import AnnotationError

BREAST = """\
study_id,series_id,image_id,laterality,view_position,height,width,breast_birads,breast_density,split
s1,se1,imgA,L,CC,3518,2800,BI-RADS 4,DENSITY C,training
s1,se1,imgB,L,MLO,3518,2800,BI-RADS 4,DENSITY C,training
s1,se2,imgC,R,CC,3518,2800,BI-RADS 1,DENSITY C,training
s2,se3,imgD,R,MLO,3580,2816,BI-RADS 5,DENSITY D,test
"""

# imgA: a mass + calcification row and a separate calcification row; imgB: a mass whose box runs past
# the right edge (as 20 VinDr boxes do) and an empty BI-RADS; imgC: No Finding (NaN box written both
# ways); imgD: a finding category outside the two concepts.
FINDING = """\
study_id,series_id,image_id,laterality,view_position,height,width,breast_birads,breast_density,finding_categories,finding_birads,xmin,ymin,xmax,ymax,split
s1,se1,imgA,L,CC,3518,2800,BI-RADS 4,DENSITY C,"['Mass', 'Suspicious Calcification']",BI-RADS 4,2355.68,1305.27,2493.11,1464.2,training
s1,se1,imgA,L,CC,3518,2800,BI-RADS 4,DENSITY C,['Suspicious Calcification'],BI-RADS 4,100.0,200.0,150.5,260.0,training
s1,se1,imgB,L,MLO,3518,2800,BI-RADS 4,DENSITY C,['Mass'],,2700.0,1000.0,2812.4,1100.0,training
s1,se2,imgC,R,CC,3518,2800,BI-RADS 1,DENSITY C,['No Finding'],,,,,,training
s2,se3,imgD,R,MLO,3580,2816,BI-RADS 5,DENSITY D,['Architectural Distortion'],BI-RADS 5,nan,nan,nan,nan,test
"""


@pytest.fixture
def vindr(tmp_path):
    (tmp_path / "breast-level_annotations.csv").write_text(BREAST)
    (tmp_path / "finding_annotations.csv").write_text(FINDING)
    return tmp_path


def test_multi_category_rows_count_for_each_concept(vindr):
    a = ann.load_vindr(vindr)
    assert list(a.images) == ["imgA", "imgB", "imgC", "imgD"]
    im = a.images["imgA"]
    assert (im.laterality, im.view, im.height, im.width) == ("L", "CC", 3518, 2800)
    assert (im.split, im.breast_birads, im.density) == ("training", "BI-RADS 4", "DENSITY C")
    assert im.has("mass") and im.has("calcification") and im.has("Mass")
    assert im.row_labels("mass") == [1, 0]
    assert im.row_labels("calcification") == [1, 1]
    assert im.boxes("mass") == [(2355.68, 1305.27, 2493.11, 1464.2)]
    assert len(im.boxes("calcification")) == 2 and len(im.boxes()) == 2
    assert im.findings[0].categories == ("Mass", "Suspicious Calcification")
    assert im.findings[0].birads == "BI-RADS 4"


def test_no_finding_image_has_one_negative_row_and_no_boxes(vindr):
    im = ann.load_vindr(vindr).images["imgC"]
    assert im.findings == []
    assert im.row_labels("mass") == [0] and im.row_labels("calcification") == [0]
    assert im.boxes() == [] and not im.has("mass")


def test_empty_birads_box_past_edge_and_nan_box(vindr):
    a = ann.load_vindr(vindr)
    b = a.images["imgB"].findings[0]
    assert b.birads is None and b.box == (2700.0, 1000.0, 2812.4, 1100.0)  # kept as written
    clipped = ann.load_vindr(vindr, clip_boxes=True).images["imgB"].findings[0]
    assert clipped.box == (2700.0, 1000.0, 2800.0, 1100.0)
    d = a.images["imgD"]
    assert d.findings[0].box is None and d.findings[0].category == "Architectural Distortion"
    assert d.row_labels("mass") == [0] and not d.has("calcification")
    assert a.skipped == []


def test_label_protocols_per_row_and_per_image(vindr):
    a = ann.load_vindr(vindr)
    assert ann.image_labels(a, "mass") == {"imgA": 1, "imgB": 1, "imgC": 0, "imgD": 0}
    rows = ann.row_labels(a, "calcification", split="training")
    assert rows == [("imgA", 1), ("imgA", 1), ("imgB", 0), ("imgC", 0)]
    assert ann.row_labels(a, "mass", split="test") == [("imgD", 0)]


def test_single_csv_path_works_too(vindr):
    only_findings = ann.load_vindr(vindr / "finding_annotations.csv")
    assert set(only_findings.images) == {"imgA", "imgB", "imgC", "imgD"}
    assert only_findings.images["imgA"].row_labels("calcification") == [1, 1]
    only_breast = ann.load_vindr(vindr / "breast-level_annotations.csv")
    assert only_breast.images["imgD"].split == "test" and only_breast.images["imgD"].findings == []


def test_missing_column_is_a_clear_error(tmp_path):
    (tmp_path / "finding_annotations.csv").write_text(
        FINDING.replace("finding_categories", "categories")
    )
    with pytest.raises(AnnotationError, match="finding_categories"):
        ann.load_vindr(tmp_path)


def test_unknown_image_in_findings_is_an_error(vindr):
    text = FINDING + FINDING.splitlines()[1].replace("imgA", "imgZ") + "\n"
    (vindr / "finding_annotations.csv").write_text(text)
    with pytest.raises(AnnotationError, match="1 image.*imgZ"):
        ann.load_vindr(vindr)


def test_unparsable_rows_are_counted_not_dropped_silently(vindr, caplog):
    bad = FINDING.splitlines()
    bad.append(bad[3].replace("['Mass']", "['Mass'").replace("imgB", "imgB"))
    bad.append(bad[3].replace("2700.0,1000.0", "2700.0,"))
    (vindr / "finding_annotations.csv").write_text("\n".join(bad) + "\n")
    a = ann.load_vindr(vindr)
    assert len(a.skipped) == 2
    assert [line for _f, line, _r in a.skipped] == [7, 8]
    assert "2 annotation row(s) skipped" in caplog.text
    assert len(a.images["imgB"].findings) == 1


def test_not_a_dataset_folder(tmp_path):
    with pytest.raises(AnnotationError, match="neither"):
        ann.load_vindr(tmp_path)


def test_generic_box_csv_by_path_and_by_uid(tmp_path):
    (tmp_path / "boxes.csv").write_text(
        "path,xmin,ymin,xmax,ymax,label\ncase/a.dcm,1,2,30.5,40,mass\n/abs/b.dcm,0,0,5,5,calc\n"
    )
    boxes = ann.load_box_csv(tmp_path / "boxes.csv")
    assert boxes[0].path == tmp_path / "case" / "a.dcm" and boxes[0].box == (1.0, 2.0, 30.5, 40.0)
    assert boxes[0].label == "mass" and str(boxes[1].path) == "/abs/b.dcm"
    (tmp_path / "uids.csv").write_text(
        "SOPInstanceUID,xmin,ymin,xmax,ymax,label\n1.2.3,1,1,2,2,x\n"
    )
    (uid,) = ann.load_box_csv(tmp_path / "uids.csv")
    assert uid.sop_instance_uid == "1.2.3" and uid.path is None
    (tmp_path / "nokey.csv").write_text("xmin,ymin,xmax,ymax,label\n1,1,2,2,x\n")
    with pytest.raises(AnnotationError, match="'path' or 'SOPInstanceUID'"):
        ann.load_box_csv(tmp_path / "nokey.csv")
    (tmp_path / "bad.csv").write_text("path,xmin,ymin,xmax,ymax,label\na.dcm,5,1,2,2,x\n")
    with pytest.raises(AnnotationError, match="line 2"):
        ann.load_box_csv(tmp_path / "bad.csv")

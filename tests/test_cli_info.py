"""``napari-mammo-sae info``: per-file summary, typed errors -> exit codes, no patient data."""

from __future__ import annotations

import json

from data_helpers import (
    PATIENT_VALUES,
    write_mammogram,
    write_not_dicom,
    write_structured_report,
)
from napari_mammo_sae.cli import main


def test_info_prints_what_the_reader_sees(tmp_path, capsys):
    path = write_mammogram(
        tmp_path / "lcc.dcm", image_laterality="L", view_code="CC", pixel_spacing=(0.07, 0.07)
    )
    assert main(["info", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "lcc.dcm: L CC" in out
    assert "L (from ImageLaterality)" in out and "CC (from ViewCodeSequence)" in out
    assert "96 x 64 pixels" in out and "0.07 x 0.07 mm (from PixelSpacing)" in out
    assert "MONOCHROME2" in out and "center 2000, width 3000, LINEAR" in out
    assert "Explicit VR Little Endian (1.2.840.10008.1.2.1)" in out
    assert "chest wall     left edge (from image)" in out
    for value in PATIENT_VALUES:
        assert value not in out + err


def test_info_cbis_file(cbis_files, capsys):
    assert main(["info", "--json", str(cbis_files[0])]) == 0
    (info,) = json.loads(capsys.readouterr().out)
    assert (info["laterality"], info["laterality_source"]) == ("L", "Laterality")
    assert (info["view"], info["view_source"]) == ("CC", "text")
    assert info["transfer_syntax"] == "RLE Lossless" and info["spacing_source"] == "default"
    assert info["sop_instance_uid"].startswith("1.3.6.1.4.1.9590")
    # CBIS PatientID holds the case name; it must not be echoed
    assert "Mass-Test" not in json.dumps(info)


def test_info_errors_give_exit_code_and_message(tmp_path, capsys):
    bad = write_not_dicom(tmp_path / "bad.dcm")
    assert main(["info", str(bad)]) == 3
    _out, err = capsys.readouterr()
    assert "bad.dcm: NotDicomError" in err and "not a DICOM file" in err
    assert "Traceback" not in err


def test_info_directory_reports_good_and_bad(tmp_path, capsys):
    write_mammogram(tmp_path / "a.dcm", image_laterality="R", view_code="MLO", chest_wall="right")
    write_structured_report(tmp_path / "sr.dcm")
    assert main(["info", "--json", str(tmp_path)]) == 3
    out, err = capsys.readouterr()
    infos = json.loads(out)
    assert [i["name"] for i in infos] == ["R MLO"]
    assert "sr.dcm: NoPixelDataError" in err
    for value in PATIENT_VALUES:
        assert value not in out + err


def test_info_frame_option(tmp_path, capsys):
    tomo = write_mammogram(tmp_path / "tomo.dcm", frames=3)
    assert main(["info", str(tomo)]) == 3
    assert "--frame" in capsys.readouterr().err
    assert main(["info", "--frame", "2", str(tomo)]) == 0
    assert "frame 2 of 3" in capsys.readouterr().out


def test_info_empty_directory(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 3
    assert "no DICOM files" in capsys.readouterr().err

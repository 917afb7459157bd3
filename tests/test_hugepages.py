"""numpy's huge-page advice is switched off only where the kernel would stall on it."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mammo_sae import hugepages


def _advice() -> bool:
    core = getattr(np, "_core", None) or np.core
    setter = core.multiarray._set_madvise_hugepage
    now = setter(True)  # returns the previous setting
    setter(now)
    return bool(now)


@pytest.mark.parametrize(
    ("policy", "stalls"),
    [
        ("always defer defer+madvise [madvise] never\n", True),
        ("[always] defer defer+madvise madvise never\n", True),
        ("always defer [defer+madvise] madvise never\n", True),
        ("always [defer] defer+madvise madvise never\n", False),
        ("always defer defer+madvise madvise [never]\n", False),
    ],
)
def test_compacts_on_fault_reads_the_selected_policy(policy, stalls):
    assert hugepages.compacts_on_fault(policy) is stalls


def test_advice_off_under_a_stalling_policy_and_kept_when_asked(tmp_path, monkeypatch):
    core = getattr(np, "_core", None) or np.core
    before = core.multiarray._set_madvise_hugepage(True)
    try:
        policy = tmp_path / "defrag"
        monkeypatch.setattr(hugepages, "DEFRAG", policy)
        monkeypatch.setattr(hugepages.sys, "platform", "linux")
        policy.write_text("always defer defer+madvise madvise [never]\n")
        assert hugepages.avoid_hugepage_stalls() is False and _advice() is True
        monkeypatch.setenv("NAPARI_MAMMO_SAE_NUMPY_HUGEPAGES", "1")
        policy.write_text("always defer defer+madvise [madvise] never\n")
        assert hugepages.avoid_hugepage_stalls() is False and _advice() is True
        monkeypatch.delenv("NAPARI_MAMMO_SAE_NUMPY_HUGEPAGES")
        assert hugepages.avoid_hugepage_stalls() is True and _advice() is False
        policy.unlink()  # no THP in this kernel: nothing to do
        core.multiarray._set_madvise_hugepage(True)
        assert hugepages.avoid_hugepage_stalls() is False and _advice() is True
    finally:
        core.multiarray._set_madvise_hugepage(before)

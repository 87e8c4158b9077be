"""Synthetic phantoms (deploy.synth): valid DICOM, determinism, truth, anatomy, knobs, CLI.

Most tests use 256x256 and few slices so the file stays well under a minute on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import free_port, require_binary, wait_port
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from deploy.synth import (
    CT_LABELS,
    MR_CLASSES,
    MR_DIFFICULTIES,
    derive_seed,
    generate_ct,
    generate_mr,
    make_ct_phantom,
    make_mr_slice,
    mr_assignment,
    write_ct_series,
    write_mr_series,
)
from deploy.synth.cli import add_parser
from deploy.synth.ct import IOP_BY_POSITION

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SMALL = {"size": 256, "slices": 6, "slice_thickness": 5.0}


# ------------------------------------------------------------------ helpers


def read_series(folder: Path) -> list[pydicom.Dataset]:
    """All IM*.dcm of a folder, in file-name order."""
    return [pydicom.dcmread(p) for p in sorted(folder.glob("IM*.dcm"))]


def build_volume(datasets: list[pydicom.Dataset]) -> tuple[np.ndarray, dict]:
    """What a volume builder does: sort by IPP along n = row x col, rescale to HU.

    Returns (hu (z, y, x) float32, geometry with origin, row, col, normal, spacing (z, y, x)).
    """
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    ordered = sorted(datasets, key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, float))))
    hu = np.stack(
        [
            ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for ds in ordered
        ]
    )
    positions = np.array([ds.ImagePositionPatient for ds in ordered], dtype=float)
    dz = (
        float(np.dot(positions[1] - positions[0], normal))
        if len(ordered) > 1
        else float(ordered[0].SliceThickness)
    )
    dy, dx = (float(v) for v in ordered[0].PixelSpacing)
    return hu, {"origin": positions[0], "row": row, "col": col, "normal": normal, "spacing": (dz, dy, dx)}


def centroid_lps(mask: np.ndarray, geo: dict) -> np.ndarray:
    """Patient-space (LPS mm) centroid of a (z, y, x) mask laid out as build_volume returns."""
    k, r, c = (idx.mean() for idx in np.nonzero(mask))
    dz, dy, dx = geo["spacing"]
    return geo["origin"] + c * dx * geo["row"] + r * dy * geo["col"] + k * dz * geo["normal"]


@pytest.fixture(scope="module")
def ct_small(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """One small CT phantom written to disk (slope 0.5 and signed pixels exercised elsewhere)."""
    phantom = make_ct_phantom(11, **SMALL)
    folder = write_ct_series(phantom, tmp_path_factory.mktemp("ct") / "ct-0000")
    return phantom, folder


@pytest.fixture(scope="module")
def ct_full() -> list:
    """Full-coverage (all organs) 256 phantoms, 5 mm slices, for truth/anatomy checks."""
    return [make_ct_phantom(seed, size=256, slice_thickness=5.0) for seed in (3, 104, 2025)]


# ------------------------------------------------------------------ DICOM validity


def test_ct_files_round_trip_through_pydicom(ct_small: tuple) -> None:
    phantom, folder = ct_small
    datasets = read_series(folder)
    assert len(datasets) == len(phantom.datasets) == 6
    raw = (folder / "IM0001.dcm").read_bytes()
    assert raw[128:132] == b"DICM"  # Part 10 preamble + prefix
    for written, ds in zip(phantom.datasets, datasets, strict=True):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == CT_STORAGE
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == written.SOPInstanceUID
        assert ds.Modality == "CT" and ds.BodyPartExamined == "ABDOMEN"
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation in (0, 1)
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) in (0.5, 1.0)
        assert ds.PatientName.family_name == "PHANTOM" and ds.PatientID.startswith("PH-")
        assert [float(v) for v in ds.ImageOrientationPatient] == [
            v for pair in IOP_BY_POSITION[ds.PatientPosition] for v in pair
        ]
        # pixel_array gives back exactly the stored values that were written.
        assert np.array_equal(ds.pixel_array, written.pixel_array)
        assert ds.pixel_array.dtype == (np.int16 if ds.PixelRepresentation else np.uint16)
    assert len({ds.SOPInstanceUID for ds in datasets}) == 6
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    # The agent's volume-builder layout reproduces the phantom's HU and label layout.
    hu, geo = build_volume(datasets)
    assert np.array_equal(hu, phantom.hu)
    assert phantom.labels.shape == hu.shape and phantom.labels.dtype == np.uint8
    assert np.array_equal(np.load(folder / "labels.npy"), phantom.labels)
    truth = json.loads((folder / "truth.json").read_text())
    assert truth == json.loads(json.dumps(phantom.truth))
    np.testing.assert_allclose(truth["geometry"]["origin_lps_mm"], geo["origin"], atol=1e-4)
    np.testing.assert_allclose(truth["geometry"]["spacing_zyx_mm"], geo["spacing"], atol=1e-4)


def test_stored_values_differ_with_slope_half_and_signed_pixels() -> None:
    """Some seeds must use slope 0.5 and PixelRepresentation 1; decoding still gives HU."""
    seen_slope, seen_signed = False, False
    for seed in range(40):
        phantom = make_ct_phantom(seed, size=256, slices=1, slice_thickness=5.0)
        ds = phantom.datasets[0]
        if float(ds.RescaleSlope) == 0.5 and not seen_slope:
            seen_slope = True
            stored = ds.pixel_array.astype(np.float64)
            np.testing.assert_array_equal(stored * 0.5 - 1024, phantom.hu[0])
            assert stored.max() > 2 * 1024  # soft tissue is stored as 2 * (HU + 1024)
        if ds.PixelRepresentation == 1:
            seen_signed = True
        if seen_slope and seen_signed:
            break
    assert seen_slope and seen_signed


def test_dcmdump_reads_ct_and_mr_cleanly(ct_small: tuple, tmp_path: Path) -> None:
    dcmdump = require_binary("dcmdump")
    _, folder = ct_small
    mr_folder = write_mr_series(make_mr_slice(5, cls="glioma", difficulty="artefact"), tmp_path / "mr")
    for path in (folder / "IM0001.dcm", folder / "IM0006.dcm", mr_folder / "IM0001.dcm"):
        proc = subprocess.run([dcmdump, str(path)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""  # no warnings or errors
        assert "PixelData" in proc.stdout and "PHANTOM^" in proc.stdout


def test_storescu_is_accepted_by_storescp(ct_small: tuple, tmp_path: Path) -> None:
    storescp, storescu = require_binary("storescp"), require_binary("storescu")
    _, folder = ct_small
    mr_folder = write_mr_series(make_mr_slice(6, cls="meningioma", difficulty="obvious"), tmp_path / "mr")
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    log = (tmp_path / "storescp.log").open("wb")
    scp = subprocess.Popen(
        [storescp, "-aet", "SYNTHSCP", "-od", str(received), str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_port(port)
        files = [*sorted(folder.glob("IM*.dcm")), mr_folder / "IM0001.dcm"]
        proc = subprocess.run(
            [storescu, "-aec", "SYNTHSCP", "127.0.0.1", str(port), *map(str, files)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "E:" not in proc.stdout + proc.stderr
        deadline = time.monotonic() + 10
        while len(list(received.iterdir())) < len(files) and time.monotonic() < deadline:
            time.sleep(0.05)
        got = sorted(p.name for p in received.iterdir())
        assert len(got) == len(files), (tmp_path / "storescp.log").read_text()
        assert sum(name.startswith("CT.") for name in got) == len(files) - 1
        assert sum(name.startswith("MR.") for name in got) == 1
    finally:
        scp.terminate()
        scp.wait(10)
        log.close()


# ------------------------------------------------------------------ determinism


def test_ct_same_seed_same_bytes_and_uids_different_seed_differs() -> None:
    a = make_ct_phantom(7, size=256, slices=3, slice_thickness=5.0)
    b = make_ct_phantom(7, size=256, slices=3, slice_thickness=5.0)
    c = make_ct_phantom(8, size=256, slices=3, slice_thickness=5.0)
    for da, db in zip(a.datasets, b.datasets, strict=True):
        assert da.PixelData == db.PixelData
        assert (da.SOPInstanceUID, da.SeriesInstanceUID, da.StudyInstanceUID) == (
            db.SOPInstanceUID,
            db.SeriesInstanceUID,
            db.StudyInstanceUID,
        )
    assert np.array_equal(a.labels, b.labels) and a.truth == b.truth
    assert a.datasets[0].SeriesInstanceUID != c.datasets[0].SeriesInstanceUID
    assert {d.SOPInstanceUID for d in a.datasets}.isdisjoint(d.SOPInstanceUID for d in c.datasets)
    assert a.datasets[0].PixelData != c.datasets[0].PixelData
    # A knob makes it another series (a drifted copy must not collide with its baseline).
    d = make_ct_phantom(7, size=256, slices=3, slice_thickness=5.0, hu_offset=50.0)
    assert d.datasets[0].SeriesInstanceUID != a.datasets[0].SeriesInstanceUID


def test_generated_series_reproducible_alone_and_sets_disjoint(tmp_path: Path) -> None:
    knobs = {"size": 256, "slices": 2, "slice_thickness": 5.0}
    folders = generate_ct(tmp_path / "a", 2, 42, **knobs)
    assert [f.name for f in folders] == ["ct-0000", "ct-0001"]
    alone = make_ct_phantom(derive_seed(42, 1), index=1, **knobs)
    write_ct_series(alone, tmp_path / "alone")
    for name in ("IM0001.dcm", "IM0002.dcm"):
        assert (tmp_path / "alone" / name).read_bytes() == (folders[1] / name).read_bytes()
    other = generate_ct(tmp_path / "b", 2, 43, **knobs)
    uids_a = {read_series(f)[0].SeriesInstanceUID for f in folders}
    uids_b = {read_series(f)[0].SeriesInstanceUID for f in other}
    assert len(uids_a) == 2 and uids_a.isdisjoint(uids_b)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["modality"] == "CT" and manifest["seed"] == 42 and manifest["n"] == 2
    assert [s["folder"] for s in manifest["series"]] == ["ct-0000", "ct-0001"]
    assert {s["series_uid"] for s in manifest["series"]} == uids_a
    assert json.loads((folders[0] / "truth.json").read_text())["params"]["set_seed"] == 42


def test_mr_same_seed_same_bytes_different_seed_differs() -> None:
    a = make_mr_slice(21, cls="glioma", difficulty="subtle")
    b = make_mr_slice(21, cls="glioma", difficulty="subtle")
    c = make_mr_slice(22, cls="glioma", difficulty="subtle")
    assert a.dataset.PixelData == b.dataset.PixelData
    assert a.dataset.SOPInstanceUID == b.dataset.SOPInstanceUID
    assert a.dataset.PixelData != c.dataset.PixelData
    assert a.dataset.SOPInstanceUID != c.dataset.SOPInstanceUID


# ------------------------------------------------------------------ truth and anatomy


def test_truth_volumes_match_mask_and_are_plausible(ct_full: list) -> None:
    for phantom in ct_full:
        truth = phantom.truth
        dz, dy, dx = truth["geometry"]["spacing_zyx_mm"]
        voxel_ml = dz * dy * dx / 1000.0
        counts = np.bincount(phantom.labels.ravel(), minlength=len(CT_LABELS))
        assert set(truth["labels"]) == set(CT_LABELS[1:])
        for name, entry in truth["labels"].items():
            value = CT_LABELS.index(name)
            assert entry["value"] == value
            assert entry["voxels"] == counts[value]
            assert entry["volume_ml"] == pytest.approx(counts[value] * voxel_ml, abs=1e-3)
        vol = {name: e["volume_ml"] for name, e in truth["labels"].items()}
        assert 1200 <= vol["liver"] <= 2000, vol
        assert 150 <= vol["spleen"] <= 350, vol
        assert 120 <= vol["kidney_left"] <= 220, vol
        assert 120 <= vol["kidney_right"] <= 220, vol
        # Every organ is entirely inside the default z coverage (none touches the end slices).
        for value in range(1, 5):
            present = np.nonzero((phantom.labels == value).any(axis=(1, 2)))[0]
            assert present.min() > 0 and present.max() < phantom.labels.shape[0] - 1


def test_organ_hu_means_in_expected_ranges(ct_full: list) -> None:
    for phantom in ct_full:
        means = {}
        for value, name in enumerate(CT_LABELS[1:], start=1):
            # Interior voxels: edges are softened (partial volume) on purpose.
            mask = ndimage.binary_erosion(phantom.labels == value, structure=np.ones((1, 3, 3), bool))
            means[name] = float(phantom.hu[mask].mean())
        assert 52 <= means["liver"] <= 68, means
        assert 40 <= means["spleen"] <= 54, means
        assert means["liver"] - means["spleen"] > 4, means
        for side in ("kidney_left", "kidney_right"):
            assert 85 <= means[side] <= 150, means  # enhancing cortex + medulla
            kidney = phantom.hu[phantom.labels == CT_LABELS.index(side)]
            assert np.percentile(kidney, 90) > 135  # cortex ~150-180
            assert np.percentile(kidney, 10) < 80  # medulla ~40-60
        background = phantom.hu[phantom.labels == 0]
        assert (background < -950).mean() > 0.2  # surrounding air
        assert (background > 350).any()  # bone


def test_laterality_and_layout_for_every_patient_position(tmp_path: Path) -> None:
    """Same anatomy whatever the orientation: liver on patient right (-x), spleen left and
    posterior, kidneys on their own sides; the label layout follows the volume-builder rule."""
    labels, centroids = {}, {}
    for position in IOP_BY_POSITION:
        phantom = make_ct_phantom(5, size=256, slices=20, slice_thickness=5.0, patient_position=position)
        folder = write_ct_series(phantom, tmp_path / position)
        datasets = read_series(folder)
        assert {ds.PatientPosition for ds in datasets} == {position}
        hu, geo = build_volume(datasets)
        assert np.array_equal(hu, phantom.hu)
        assert phantom.truth["geometry"]["patient_position"] == position
        cents = {name: centroid_lps(phantom.labels == v, geo) for v, name in enumerate(CT_LABELS) if v}
        assert cents["liver"][0] < 0, (position, cents["liver"])
        assert cents["liver"][0] < cents["spleen"][0]
        assert cents["kidney_right"][0] < cents["kidney_left"][0]
        assert cents["spleen"][1] > cents["liver"][1]  # spleen posterior (+y) to the liver
        labels[position], centroids[position] = phantom.labels, cents
    # Exactly the same voxels, just re-laid out by IOP and slice order.
    base = labels["HFS"]
    assert np.array_equal(labels["HFP"], base[:, ::-1, ::-1])
    assert np.array_equal(labels["FFS"], base[::-1, :, ::-1])
    assert np.array_equal(labels["FFP"], base[::-1, ::-1, :])
    for position in IOP_BY_POSITION:
        for name, c in centroids[position].items():
            np.testing.assert_allclose(c, centroids["HFS"][name], atol=1e-3)


def test_agent_volume_builder_agrees_with_truth_layout() -> None:
    """Contract with agent.imaging: build_volume returns exactly phantom.hu, on truth's grid."""
    volume_mod = pytest.importorskip("agent.imaging.volume")
    for position in IOP_BY_POSITION:
        phantom = make_ct_phantom(8, size=256, slices=4, slice_thickness=2.5, patient_position=position)
        volume = volume_mod.build_volume(phantom.datasets)
        g = phantom.truth["geometry"]
        assert np.array_equal(volume.array, phantom.hu), position
        np.testing.assert_allclose(volume.spacing, g["spacing_zyx_mm"], atol=1e-6)
        np.testing.assert_allclose(volume.origin, g["origin_lps_mm"], atol=1e-4)
        direction = np.array(volume.direction)
        np.testing.assert_allclose(direction[:, 0], g["row_dir"])
        np.testing.assert_allclose(direction[:, 1], g["col_dir"])
        np.testing.assert_allclose(direction[:, 2], g["slice_normal"])
    mr = make_mr_slice(3)
    assert np.array_equal(volume_mod.build_volume([mr.dataset]).array[0], mr.image)


def test_iop_matches_patient_position_convention() -> None:
    """DICOM C.7.6.2.1.1: written literally so a wrong shared table cannot pass unnoticed."""
    expected = {
        "HFS": [1, 0, 0, 0, 1, 0],
        "HFP": [-1, 0, 0, 0, -1, 0],
        "FFS": [-1, 0, 0, 0, 1, 0],
        "FFP": [1, 0, 0, 0, -1, 0],
    }
    for position, iop in expected.items():
        phantom = make_ct_phantom(2, size=256, slices=1, slice_thickness=5.0, patient_position=position)
        ds = phantom.datasets[0]
        assert ds.PatientPosition == position
        assert [float(v) for v in ds.ImageOrientationPatient] == iop


def test_random_orientations_and_slice_orders_occur() -> None:
    """The default draws vary patient position, file order and instance numbering."""
    seen_pos, seen_order, seen_numbering = set(), set(), set()
    for seed in range(16):
        g = make_ct_phantom(seed, size=256, slices=2, slice_thickness=5.0).truth["geometry"]
        seen_pos.add(g["patient_position"])
        seen_order.add(g["ascending_files"])
        seen_numbering.add(g["instance_numbers_follow_files"])
    assert seen_pos == set(IOP_BY_POSITION)
    assert seen_order == {True, False} and seen_numbering == {True, False}


def test_file_order_and_instance_numbers_match_truth(ct_small: tuple) -> None:
    phantom, folder = ct_small
    datasets = read_series(folder)
    g = phantom.truth["geometry"]
    proj = [float(np.dot(g["slice_normal"], np.array(ds.ImagePositionPatient, float))) for ds in datasets]
    assert (np.diff(proj) > 0).all() if g["ascending_files"] else (np.diff(proj) < 0).all()
    numbers = [int(ds.InstanceNumber) for ds in datasets]
    assert numbers == (list(range(1, 7)) if g["instance_numbers_follow_files"] else list(range(6, 0, -1)))


# ------------------------------------------------------------------ knobs


def test_hu_offset_shifts_mean_hu() -> None:
    base = make_ct_phantom(9, size=256, slices=4, slice_thickness=5.0)
    drift = make_ct_phantom(9, size=256, slices=4, slice_thickness=5.0, hu_offset=100.0)
    body = base.hu > -900  # away from air clipped at -1024
    assert float((drift.hu - base.hu)[body].mean()) == pytest.approx(100.0, abs=1.0)
    assert drift.truth["params"]["hu_offset"] == 100.0
    assert np.array_equal(base.labels, drift.labels)  # anatomy untouched


def test_slice_thickness_size_manufacturer_and_noise_knobs() -> None:
    thin = make_ct_phantom(12, size=512, slices=3, slice_thickness=2.5, manufacturer="ACME Imaging")
    _, geo = build_volume(thin.datasets)
    assert geo["spacing"][0] == pytest.approx(2.5)
    assert {float(ds.SliceThickness) for ds in thin.datasets} == {2.5}
    assert {(ds.Rows, ds.Columns) for ds in thin.datasets} == {(512, 512)}
    assert {ds.Manufacturer for ds in thin.datasets} == {"ACME Imaging"}
    assert thin.truth["geometry"]["spacing_zyx_mm"][0] == 2.5
    assert 0.6 <= thin.truth["geometry"]["spacing_zyx_mm"][1] <= 1.0
    quiet = make_ct_phantom(12, size=256, slices=6, slice_thickness=5.0, noise=0.0)
    loud = make_ct_phantom(12, size=256, slices=6, slice_thickness=5.0, noise=2.0)
    liver = ndimage.binary_erosion(quiet.labels == 1, structure=np.ones((1, 5, 5), bool))
    assert liver.sum() > 100
    assert float(quiet.hu[liver].std()) < 2.0
    assert 15.0 < float(loud.hu[liver].std()) < 50.0
    default = make_ct_phantom(12, size=256, slices=6, slice_thickness=5.0)
    assert 7.0 < float(default.hu[liver].std()) < 25.0  # ~10-20 HU scanner noise


def test_slices_knob_and_bad_knobs() -> None:
    assert len(make_ct_phantom(1, size=256, slices=2, slice_thickness=5.0).datasets) == 2
    with pytest.raises(ValueError):
        make_ct_phantom(1, size=300)
    with pytest.raises(ValueError):
        make_ct_phantom(-1)
    with pytest.raises(ValueError):
        make_mr_slice(1, cls="astrocytoma")


# ------------------------------------------------------------------ MR


def test_mr_set_is_balanced_valid_and_matches_truth(tmp_path: Path) -> None:
    folders = generate_mr(tmp_path, 12, 77)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    classes = [s["class"] for s in manifest["series"]]
    diffs = [s["difficulty"] for s in manifest["series"]]
    assert {c: classes.count(c) for c in MR_CLASSES} == dict.fromkeys(MR_CLASSES, 3)
    assert {d: diffs.count(d) for d in MR_DIFFICULTIES} == dict.fromkeys(MR_DIFFICULTIES, 4)
    assert len({(c, d) for c, d in zip(classes, diffs, strict=True)}) == 12
    for i, folder in enumerate(folders):
        assert folder.name == f"mr-{i:04d}"
        (ds,) = read_series(folder)
        truth = json.loads((folder / "truth.json").read_text())
        assert ds.SOPClassUID == MR_STORAGE and ds.Modality == "MR"
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.BodyPartExamined in ("BRAIN", "HEAD") and "T1" in ds.SeriesDescription
        assert ds.Rows == ds.Columns and ds.Rows in (224, 240, 256)
        assert 0.8 <= float(ds.PixelSpacing[0]) <= 1.1
        assert truth["class"] == classes[i] and MR_CLASSES[truth["class_index"]] == truth["class"]
        assert (truth["class"], truth["difficulty"]) == mr_assignment(i)
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint16 and 0 < pixels.max() <= 4095
        alone = make_mr_slice(derive_seed(77, i), cls=truth["class"], difficulty=truth["difficulty"], index=i)
        assert np.array_equal(pixels, alone.image.astype(np.uint16))
    # Random global scaling: white-matter level varies a lot between images.
    scales = [json.loads((f / "truth.json").read_text())["acquisition"]["wm_intensity"] for f in folders]
    assert max(scales) / min(scales) > 1.5


def test_mr_classes_differ_where_expected() -> None:
    seed = 314
    normal = make_mr_slice(seed, cls="no_tumour", difficulty="obvious")
    assert normal.lesion_mask is None and normal.truth["lesion"] is None
    for cls in MR_CLASSES[1:]:
        p = make_mr_slice(seed, cls=cls, difficulty="obvious")
        assert p.class_index == MR_CLASSES.index(cls) and p.cls == cls
        assert p.lesion_mask is not None and p.lesion_mask.sum() > 30
        assert not np.array_equal(p.image, normal.image)
        lesion = p.truth["lesion"]
        u, v = lesion["center_head_mm"]
        a, b = p.truth["head"]["semi_axes_mm"]
        rho = float(np.hypot(u / a, v / b))
        if cls == "glioma":
            assert abs(u) > 10 and rho < 0.85  # intra-axial, in a hemisphere
            # Ring enhancement with a darker necrotic core.
            mask = p.lesion_mask
            core = ndimage.binary_erosion(mask, iterations=4)
            rim = mask & ~ndimage.binary_erosion(mask, iterations=2)
            assert p.image[rim].mean() > 1.3 * p.image[core].mean()
        elif cls == "meningioma":
            assert rho > 0.6  # dural-based, at the skull edge
        else:
            assert abs(u) < 3 and p.truth["level"] == "sellar"  # midline sella
        # Same seed = same head and global scale: the lesion region is brighter than the same
        # region without a lesion, and enhances well above white matter.
        scale = p.truth["acquisition"]["wm_intensity"]
        assert p.truth["acquisition"]["wm_intensity"] == normal.truth["acquisition"]["wm_intensity"]
        bright, before = (
            np.percentile(p.image[p.lesion_mask], 90),
            np.percentile(normal.image[p.lesion_mask], 90),
        )
        assert bright > 1.25 * before, (cls, bright, before)
        assert bright > 1.4 * scale


def test_mr_difficulty_changes_size_contrast_and_artefacts() -> None:
    obvious = make_mr_slice(55, cls="meningioma", difficulty="obvious")
    subtle = make_mr_slice(55, cls="meningioma", difficulty="subtle")
    artefact = make_mr_slice(55, cls="meningioma", difficulty="artefact")
    assert obvious.lesion_mask.sum() > 2 * subtle.lesion_mask.sum()
    assert obvious.truth["lesion"]["contrast"] > subtle.truth["lesion"]["contrast"] + 0.2
    assert artefact.truth["artefacts"]["motion_ghosts"] and artefact.truth["artefacts"]["bias_field"]
    assert not obvious.truth["artefacts"]["motion_ghosts"]

    def air_level(p) -> float:  # noise and ghosts show up in the air around the head
        scale = p.truth["acquisition"]["wm_intensity"]
        img = p.image / scale
        head = ndimage.binary_dilation(img > 0.3, iterations=6)
        head = ndimage.binary_fill_holes(head)
        return float(img[~head].mean())

    assert air_level(artefact) > 2 * air_level(obvious)


# ------------------------------------------------------------------ CLI


def test_cli_writes_series_manifest_and_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="edge-deploy")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = "synth ct --n 2 --seed 4 --size 256 --slices 3 --slice-thickness 5 --hu-offset -20 --manufacturer ACME"
    args = parser.parse_args([*argv.split(), "--out", str(tmp_path / "ct")])
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("ct-0000  3 instances") and out[1].endswith("ct-0001  3 instances")
    assert "wrote 2 CT series" in out[-1]
    manifest = json.loads((tmp_path / "ct" / "manifest.json").read_text())
    assert manifest["knobs"]["hu_offset"] == -20.0 and len(manifest["series"]) == 2
    assert read_series(tmp_path / "ct" / "ct-0001")[0].Manufacturer == "ACME"

    args = parser.parse_args(
        ["synth", "mr", "--out", str(tmp_path / "mr"), "--n", "4", "--difficulty", "subtle"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and "wrote 4 MR series" in out[-1]
    manifest = json.loads((tmp_path / "mr" / "manifest.json").read_text())
    assert [s["class"] for s in manifest["series"]] == list(MR_CLASSES)
    assert {s["difficulty"] for s in manifest["series"]} == {"subtle"}
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", "ct", "--out", str(tmp_path), "--size", "300"])


# ------------------------------------------------------------------ speed (reported, not asserted)


def test_report_generation_time_512(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    phantom = make_ct_phantom(1, size=512, slices=100)
    elapsed = time.perf_counter() - start
    assert phantom.hu.shape == (100, 512, 512) and len(phantom.datasets) == 100
    with capsys.disabled():
        print(f"\n[synth] 100-slice 512x512 CT series generated in {elapsed:.2f} s")

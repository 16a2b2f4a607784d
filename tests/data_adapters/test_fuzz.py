"""Fuzz test of the data adapters: hostile files from a fixed seed, read in a child process under
an address-space limit.

2,000 mutants of small real DICOM files (truncated, bytes flipped, element lengths and image
dimensions that lie, pixel data missing or doubled, wrong transfer syntax, garbage, empty) go to
the DICOM adapter in one folder; mutated CSV and Parquet exports go to the table adapter one by
one. The hospital's process must never crash nor grow its address space beyond the limit; every
DICOM file is used or reported with a reason, every table loads with each row used or reported,
or is refused with a DataError that names the file and quotes no patient id.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import re
import resource
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pydicom.data
import pytest
import yaml

from fedward.data_adapters.demo import write_demo_data
from fedward.data_adapters.dicom import load_dicom
from fedward.data_adapters.report import DataReport
from fedward.data_adapters.samples import Samples
from fedward.data_adapters.tables import load_table
from fedward.config import DicomSpec, FeatureSpec, LabelRule, TableSpec
from fedward.errors import DataError
from tests.data_adapters.mutations import CSV_MUTATIONS, DICOM_MUTATIONS, PARQUET_MUTATIONS, Mutation

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the address-space limit is enforced on Linux only")

DICOM_FILES = 2000
TABLE_FILES = 200  # per format
# What a load may add to the address space of a process that has already loaded once (torch alone
# reserves about 2 GB): above a frame at the adapter's size cap, well below a 65535 x 65535 image.
HEADROOM = 2 << 30
TIMEOUT_S = 600
# pydicom's own test files: other transfer syntaxes (RLE, JPEG, JPEG-LS, JPEG 2000, deflate, big
# endian, implicit VR), colour, palette, odd sizes and multi-frame files.
PYDICOM_SEEDS = (
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "JPEGLSNearLossless_08.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_small_odd.dcm", "SC_ybr_full_422_uncompressed.dcm",
    "examples_palette.dcm", "image_dfl.dcm", "SC_rgb_rle_16bit_2frame.dcm", "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless, by GDCM
    # (an RT dose grid is no image: not a seed)
)
EHR = yaml.safe_load((Path(__file__).parents[2] / "configs" / "demo_ehr.yaml").read_text())["data"]["table"]


# --- the child process ---------------------------------------------------------------------------


def _address_space() -> tuple[int, int]:
    """(current, peak) virtual memory of this process in bytes."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) << 10 for key in ("VmSize", "VmPeak"))


def _limit_address_space() -> int:
    limit = _address_space()[0] + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


def _skips(report: DataReport) -> list[list[str]]:
    return [[s.source, s.field, s.reason, s.detail] for s in report.skipped]


def _used_files(samples: Samples) -> set[str]:
    return {sample.split("#frame")[0] for sample in samples.sample_ids}


def _run_child(task: Callable, result: Path, *args) -> None:
    result.write_text(json.dumps(task(*args)))


def in_limited_process(tmp_path: Path, task: Callable, *args) -> dict:
    """`task(*args)` in a fresh process (which limits its own address space), its result as JSON."""
    result = tmp_path / f"{task.__name__}.json"
    process = multiprocessing.get_context("spawn").Process(target=_run_child, args=(task, result, *args))
    process.start()
    process.join(TIMEOUT_S)
    if process.is_alive():
        process.kill()
        pytest.fail(f"{task.__name__} did not finish within {TIMEOUT_S} s")
    assert process.exitcode == 0, f"the hospital's process crashed: exit code {process.exitcode} (a negative one is a signal)"
    return json.loads(result.read_text())


def dicom_task(seeds: Path, mutants: Path) -> dict:
    spec = DicomSpec(label=LabelRule(column="unused"), image_size=32, frames="all")
    # A first load of the intact seeds brings decoders and torch's threads into the address space.
    seed_report = DataReport("fuzz")
    seeds_used = _used_files(load_dicom(seeds, spec, seed_report, labelled=False))
    limit = _limit_address_space()
    report = DataReport("fuzz")
    samples = load_dicom(mutants, spec, report, labelled=False)
    return {
        "seeds_used": len(seeds_used),
        "seeds_duplicated": seed_report.counts().get("duplicate_instance", 0),
        "limit": limit,
        "peak": _address_space()[1],
        "used": sorted(_used_files(samples)),
        "skipped": _skips(report),
        "pixels_in_unit_range": bool(((0 <= samples.features) & (samples.features <= 1)).all()),  # NaN fails too
    }


def table_spec(file: str) -> TableSpec:
    features = tuple(FeatureSpec(name=name, type=kind) for name, kind in EHR["features"].items())
    return TableSpec(file=file, features=features, label=LabelRule(**EHR["label"]), patient_id=EHR["patient_id"])


def table_task(folder: Path, seeds: list[str], mutants: list[str]) -> dict:
    seed_rows = [load_table(folder, table_spec(file), DataReport("fuzz")).labels.size for file in seeds]
    limit = _limit_address_space()
    outcomes = {}
    for file in mutants:
        report = DataReport("fuzz")
        try:
            samples = load_table(folder, table_spec(file), report)
        except DataError as e:
            outcomes[file] = {"refused": str(e)}
        except Exception as e:  # what the adapter must never let through
            outcomes[file] = {"unexpected": f"{type(e).__name__}: {e}"}
        else:
            outcomes[file] = {"used": samples.sample_ids, "skipped": _skips(report)}
    return {"seed_rows": seed_rows, "limit": limit, "peak": _address_space()[1], "outcomes": outcomes}


# --- inputs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "demo"
    write_demo_data(out, hospitals=3, seed=0, images_per_hospital=(20, 20, 20), rows_per_hospital=(40, 20, 20))
    return out


def write_mutants(folder: Path, seeds: dict[str, bytes], mutations: dict[str, Mutation], count: int, suffix: str) -> list[str]:
    """`count` files `NNNN-mutation-seed`, mutations in turn, seeds drawn, all from one fixed seed."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    names, seed_names = list(mutations), list(seeds)
    files = []
    for i in range(count):
        mutation, seed = names[i % len(names)], seed_names[int(rng.integers(len(seed_names)))]
        files.append(f"{i:04d}-{mutation}-{Path(seed).stem}{suffix}")
        (folder / files[-1]).write_bytes(mutations[mutation](seeds[seed], rng))
    return files


def mutation_of(file: str) -> str:
    return file.split("-")[1]


def shape_of(message: str, file: str) -> str:
    """A refusal's message without its file, names and numbers, to count refusals by kind."""
    message = re.sub(r"'[^']*'", "'X'", re.sub(rf"\S*{re.escape(file)}'?:? ?", "", message))
    return re.sub(r"\d+", "N", " ".join(message.split()))[:110]


# --- DICOM ---------------------------------------------------------------------------------------


def test_dicom_adapter_survives_2000_mutated_files(demo, tmp_path):
    seeds = {f"demo_{site}.dcm": min((demo / f"hospital_{site}" / "images").rglob("*.dcm")).read_bytes() for site in "abc"}
    seeds |= {name: Path(pydicom.data.get_testdata_file(name, download=False)).read_bytes() for name in PYDICOM_SEEDS}
    (tmp_path / "seeds" / "images").mkdir(parents=True)
    for name, data in seeds.items():
        (tmp_path / "seeds" / "images" / name).write_bytes(data)
    files = write_mutants(tmp_path / "mutants" / "images", seeds, DICOM_MUTATIONS, DICOM_FILES, ".dcm")

    got = in_limited_process(tmp_path, dicom_task, tmp_path / "seeds", tmp_path / "mutants")

    sources = {f"images/{file}" for file in files}
    used, skipped = set(got["used"]), [source for source, *_ in got["skipped"]]
    reasons = Counter(reason for _, _, reason, _ in got["skipped"])
    outcome = {source: reason for source, _, reason, _ in got["skipped"]} | dict.fromkeys(used, "used")
    per_mutation = Counter((mutation_of(Path(source).name), result) for source, result in outcome.items())
    print(f"\nDICOM fuzz: {len(files)} files from {len(seeds)} seeds, under a limit of {got['limit'] / 2**30:.2f} GiB "
          f"(peak {got['peak'] / 2**30:.2f} GiB): {len(used)} used, skipped per reason {dict(sorted(reasons.items()))}")
    for mutation in DICOM_MUTATIONS:
        print(f"  {mutation:18} " + ", ".join(f"{r} {n}" for (m, r), n in sorted(per_mutation.items()) if m == mutation))

    assert len(files) >= 2000
    # Every seed is a decodable image; pydicom's MR_small files are one image in several syntaxes, used once.
    assert got["seeds_used"] + got["seeds_duplicated"] == len(seeds) and got["seeds_used"] >= 10
    assert used | set(skipped) == sources and not used & set(skipped)  # every file used or skipped ...
    assert len(skipped) == len(set(skipped))  # ... and reported once
    assert all(field and reason and detail for _, field, reason, detail in got["skipped"])
    # A decoder's MemoryError is caught and reported like any other failure; here it would mean an
    # allocation that only the limit stopped.
    assert not [s for s in got["skipped"] if "MemoryError" in s[3]]
    assert reasons["image_too_large"] > 0  # declared 65535 x 65535 frames, refused before any allocation
    # A mutant keeps its seed's SOPInstanceUID: decoded, it is used once and its copies skipped as duplicates.
    assert len(used) + reasons["duplicate_instance"] > 100 and got["pixels_in_unit_range"]


# --- tables --------------------------------------------------------------------------------------


def test_table_adapter_survives_mutated_csv_and_parquet(demo, tmp_path):
    csv = demo / "hospital_a" / "ehr.csv"
    parquet = io.BytesIO()
    pq.write_table(pacsv.read_csv(csv), parquet)  # typed columns, as a warehouse export holds them
    folder = tmp_path / "tables"
    folder.mkdir()
    (folder / "seed.csv").write_bytes(csv.read_bytes())
    (folder / "seed.parquet").write_bytes(parquet.getvalue())
    mutants = {
        ".csv": write_mutants(folder, {"ehr": csv.read_bytes()}, CSV_MUTATIONS, TABLE_FILES, ".csv"),
        ".parquet": write_mutants(folder, {"ehr": parquet.getvalue()}, PARQUET_MUTATIONS, TABLE_FILES, ".parquet"),
    }

    got = in_limited_process(tmp_path, table_task, folder, ["seed.csv", "seed.parquet"], [*mutants[".csv"], *mutants[".parquet"]])

    patient_ids = pacsv.read_csv(csv).column("patient_id").to_pylist()
    assert got["seed_rows"] == [len(patient_ids)] * 2
    print(f"\nTable fuzz, under a limit of {got['limit'] / 2**30:.2f} GiB (peak {got['peak'] / 2**30:.2f} GiB):")
    for suffix, files in mutants.items():
        outcomes = {file: got["outcomes"][file] for file in files}
        loaded = {file: o for file, o in outcomes.items() if "used" in o}
        refused = {file: o["refused"] for file, o in outcomes.items() if "refused" in o}
        rows = Counter(reason for o in loaded.values() for *_, reason, _ in o["skipped"])
        kinds = Counter(shape_of(message, file) for file, message in refused.items())
        print(f"  {suffix}: {len(files)} files, {len(loaded)} loaded (rows skipped per reason {dict(rows)}), "
              f"{len(refused)} refused:")
        for kind, n in kinds.most_common():
            print(f"    {n:4}  {kind}")

        assert not {file: o["unexpected"] for file, o in outcomes.items() if "unexpected" in o}
        assert loaded and refused
        for file, message in refused.items():
            assert file in message, message
        for file, o in loaded.items():
            used = [int(sample.removeprefix("row ")) for sample in o["used"]]
            skipped = [int(source.rsplit(" row ", 1)[1]) for source, *_ in o["skipped"]]
            assert sorted(used + skipped) == list(range(1, len(used) + len(skipped) + 1)), file  # each row once
            assert all(field and reason and detail for _, field, reason, detail in o["skipped"]), file
            if suffix == ".parquet":
                assert len(used) + len(skipped) == pq.read_metadata(folder / file).num_rows, file
        # Refusals travel to the consortium's driver: they must quote no patient's values.
        texts = [*refused.values(), *(detail for o in loaded.values() for *_, detail in o["skipped"])]
        assert not [text for text in texts if any(pid in text for pid in patient_ids)]

"""Specification of the datalist utilities: CSV -> datalist, datalist loading, longitudinal pairs, and the CLI run."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.io.datalist import as_flag, csv_to_datalist, load_datalist, longitudinal_pairs  # noqa: E402

COLUMNS = {"image": "path", "subject": "PTID", "visit": "VISCODE", "age": "AGE", "sex": "PTGENDER", "diagnosis": "DX"}
HEADER = ["PTID", "VISCODE", "path", "AGE", "PTGENDER", "DX"]


def write_csv(path: Path, rows: list[list], header: list[str] = HEADER) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def cohort(tmp_path) -> Path:
    """Ten subjects with two visits each; image files exist under images/ next to the CSV."""
    (tmp_path / "images").mkdir()
    rows = []
    for s in range(10):
        for visit, years in (("bl", 0), ("m12", 1)):
            image = f"images/sub{s:04d}_{visit}.nii.gz"
            (tmp_path / image).touch()
            rows.append([f"{s:04d}", visit, image, f"{70 + s + years}.5", "M" if s % 2 else "F", "CN"])
    return write_csv(tmp_path / "cohort.csv", rows)


def read(path) -> dict:
    return json.loads(Path(path).read_text())


# csv_to_datalist


def test_csv_to_datalist_writes_every_row_into_training_or_validation(cohort, tmp_path):
    out = csv_to_datalist(cohort, COLUMNS, tmp_path / "datalist.json")

    datalist = read(out)
    assert set(datalist) == {"training", "validation"}
    assert len(datalist["training"]) + len(datalist["validation"]) == 20
    assert set(datalist["training"][0]) == set(COLUMNS)


def test_csv_to_datalist_returns_the_output_path(cohort, tmp_path):
    assert csv_to_datalist(cohort, COLUMNS, tmp_path / "datalist.json") == str(tmp_path / "datalist.json")


def test_numeric_cells_become_numbers_and_codes_and_ids_stay_strings(cohort, tmp_path):
    record = read(csv_to_datalist(cohort, COLUMNS, tmp_path / "datalist.json", val_fraction=0.0))["training"][0]
    assert record["age"] == 70.5
    assert record["subject"] == "0000"  # leading zeros of an id survive
    assert record["visit"] == "bl" and record["sex"] == "F" and record["diagnosis"] == "CN"


def test_integer_cells_become_int(tmp_path):
    (tmp_path / "a.nii").touch()
    csv_path = write_csv(tmp_path / "c.csv", [["a.nii", "72"]], header=["path", "AGE"])
    record = read(csv_to_datalist(csv_path, {"image": "path", "age": "AGE"}, tmp_path / "d.json", val_fraction=0))
    assert record["training"][0]["age"] == 72 and isinstance(record["training"][0]["age"], int)


def test_image_paths_are_written_relative_to_the_datalist_folder(cohort, tmp_path):
    out = csv_to_datalist(cohort, COLUMNS, tmp_path / "lists" / "datalist.json", val_fraction=0.0)
    image = read(out)["training"][0]["image"]
    assert not os.path.isabs(image)
    assert (tmp_path / "lists" / image).resolve() == (tmp_path / "images" / "sub0000_bl.nii.gz").resolve()


def test_base_dir_overrides_the_csv_folder_for_relative_image_paths(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "scan.nii").touch()
    csv_path = write_csv(tmp_path / "c.csv", [["scan.nii"]], header=["path"])
    out = csv_to_datalist(csv_path, {"image": "path"}, tmp_path / "d.json", val_fraction=0, base_dir=tmp_path / "data")
    assert load_datalist(out)[0]["image"] == str(tmp_path / "data" / "scan.nii")


def test_split_keeps_every_subject_in_exactly_one_split(cohort, tmp_path):
    datalist = read(csv_to_datalist(cohort, COLUMNS, tmp_path / "datalist.json", val_fraction=0.3))
    training = {r["subject"] for r in datalist["training"]}
    validation = {r["subject"] for r in datalist["validation"]}
    assert not training & validation
    assert len(validation) == 3 and len(training) == 7  # the fraction counts subjects, not rows


def test_split_is_the_same_for_the_same_seed(cohort, tmp_path):
    first = read(csv_to_datalist(cohort, COLUMNS, tmp_path / "a.json", seed=7))
    second = read(csv_to_datalist(cohort, COLUMNS, tmp_path / "b.json", seed=7))
    assert first == second


def test_split_changes_with_the_seed(cohort, tmp_path):
    datalists = [read(csv_to_datalist(cohort, COLUMNS, tmp_path / f"{seed}.json", seed=seed)) for seed in range(5)]
    splits = {frozenset(r["subject"] for r in datalist["validation"]) for datalist in datalists}
    assert len(splits) > 1


def test_rows_without_subject_column_are_split_individually(cohort, tmp_path):
    columns = {"image": "path", "age": "AGE"}
    datalist = read(csv_to_datalist(cohort, columns, tmp_path / "d.json", val_fraction=0.5))
    assert len(datalist["training"]) == len(datalist["validation"]) == 10


def test_missing_column_error_names_the_column_and_lists_available_ones(cohort, tmp_path):
    with pytest.raises(ValueError, match="'RID'") as error:
        csv_to_datalist(cohort, {**COLUMNS, "subject": "RID"}, tmp_path / "d.json")
    assert "PTID" in str(error.value) and "VISCODE" in str(error.value)


def test_empty_cell_error_names_the_csv_row_and_column(tmp_path):
    (tmp_path / "a.nii").touch()
    rows = [["s1", "bl", "a.nii", "70", "F", "CN"], ["s2", "bl", "a.nii", "", "M", "AD"]]
    csv_path = write_csv(tmp_path / "c.csv", rows)
    with pytest.raises(ValueError, match=r"row 3, column 'AGE'"):
        csv_to_datalist(csv_path, COLUMNS, tmp_path / "d.json")


def test_missing_image_error_names_the_row_and_path(tmp_path):
    csv_path = write_csv(tmp_path / "c.csv", [["s1", "bl", "nowhere/a.nii", "70", "F", "CN"]])
    with pytest.raises(FileNotFoundError, match=r"row 2.*nowhere/a\.nii"):
        csv_to_datalist(csv_path, COLUMNS, tmp_path / "d.json")


def test_missing_csv_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        csv_to_datalist(tmp_path / "absent.csv", COLUMNS, tmp_path / "d.json")


def test_columns_without_image_are_rejected(cohort, tmp_path):
    with pytest.raises(ValueError, match="'image'"):
        csv_to_datalist(cohort, {"subject": "PTID"}, tmp_path / "d.json")


def test_failed_conversion_leaves_an_existing_datalist_untouched(tmp_path):
    output = tmp_path / "d.json"
    output.write_text('{"training": []}')
    csv_path = write_csv(tmp_path / "c.csv", [["s1", "bl", "missing.nii", "70", "F", "CN"]])
    with pytest.raises(FileNotFoundError):
        csv_to_datalist(csv_path, COLUMNS, output)
    assert output.read_text() == '{"training": []}'


def test_writing_leaves_no_temporary_files(cohort, tmp_path):
    out_dir = tmp_path / "out"
    csv_to_datalist(cohort, COLUMNS, out_dir / "d.json")
    csv_to_datalist(cohort, COLUMNS, out_dir / "d.json")  # overwrite in place
    assert [p.name for p in out_dir.iterdir()] == ["d.json"]


# load_datalist


def test_load_datalist_resolves_relative_image_paths_to_existing_files(cohort, tmp_path):
    out = csv_to_datalist(cohort, COLUMNS, tmp_path / "lists" / "datalist.json")
    records = load_datalist(out, "training")
    assert all(os.path.isabs(r["image"]) and os.path.isfile(r["image"]) for r in records)


def test_load_datalist_keeps_absolute_paths_and_resolves_labels(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": [{"image": "/abs/a.nii", "label": "seg/a.nii"}]}))
    record = load_datalist(path)[0]
    assert record["image"] == "/abs/a.nii"
    assert record["label"] == str(tmp_path / "seg" / "a.nii")


def test_load_datalist_missing_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_datalist(tmp_path / "nothing.json")


def test_load_datalist_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"training": [')
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        load_datalist(path)


def test_load_datalist_missing_key_names_the_key_and_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="d.json.*'validation'"):
        load_datalist(path, "validation")


def test_load_datalist_record_without_image_is_rejected(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii"}, {"age": 70}]}))
    with pytest.raises(ValueError, match="record 1 .*'image'"):
        load_datalist(path)


# longitudinal_pairs


def scan(subject, visit, age, image=None, **covariates):
    return {"image": image or f"{subject}_{visit}.nii", "subject": subject, "visit": visit, "age": age, **covariates}


def test_pairs_go_from_earlier_to_later_visits_of_the_same_subject():
    records = [scan("a", "m12", 71), scan("b", "bl", 60), scan("a", "bl", 70), scan("b", "m06", 60.5)]
    pairs = longitudinal_pairs(records)
    assert [(p["image_source"], p["image_target"]) for p in pairs] == [
        ("a_bl.nii", "a_m12.nii"),
        ("b_bl.nii", "b_m06.nii"),
    ]


def test_visit_codes_are_ordered_by_month_not_alphabetically():
    records = [scan("a", "m120", 80), scan("a", "m18", 71.5), scan("a", "bl", 70)]
    pairs = longitudinal_pairs(records, consecutive_only=True)
    assert [(p["source_visit"], p["target_visit"]) for p in pairs] == [("bl", "m18"), ("m18", "m120")]


def test_all_pairs_include_every_earlier_later_combination():
    records = [scan("a", 0, 70), scan("a", 12, 71), scan("a", 24, 72)]
    assert [(p["source_age"], p["target_age"]) for p in longitudinal_pairs(records)] == [(70, 71), (70, 72), (71, 72)]


def test_pairs_carry_source_and_target_covariates():
    records = [scan("a", "bl", 70, sex="F", diagnosis="CN"), scan("a", "m24", 72, sex="F", diagnosis="MCI")]
    (pair,) = longitudinal_pairs(records)
    assert pair["subject"] == "a"
    assert (pair["source_age"], pair["target_age"]) == (70, 72)
    assert (pair["source_diagnosis"], pair["target_diagnosis"]) == ("CN", "MCI")
    assert pair["source_sex"] == pair["target_sex"] == "F"


def test_records_without_visit_are_ordered_by_age():
    records = [{"image": "late.nii", "subject": "a", "age": 75}, {"image": "early.nii", "subject": "a", "age": 70}]
    (pair,) = longitudinal_pairs(records)
    assert (pair["image_source"], pair["image_target"]) == ("early.nii", "late.nii")


def test_scans_at_the_same_time_point_are_not_paired():
    records = [scan("a", "bl", 70, image="x.nii"), scan("a", "bl", 70, image="y.nii")]
    assert longitudinal_pairs(records) == []


def test_single_visit_subjects_give_no_pairs():
    assert longitudinal_pairs([scan("a", "bl", 70), scan("b", "bl", 60)]) == []


def test_pairs_need_a_subject_per_record():
    with pytest.raises(ValueError, match="'subject'"):
        longitudinal_pairs([{"image": "a.nii", "age": 70}])


# make_datalist run


@pytest.mark.slow
def test_make_datalist_run_writes_a_datalist_from_the_command_line(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for subject in ("s1", "s2", "s3"):
        (tmp_path / "img" / f"{subject}.nii.gz").touch()
        rows.append([f"img/{subject}.nii.gz", subject, "70", "F"])
    csv_path = write_csv(tmp_path / "x.csv", rows, header=["path", "id", "age", "sex"])
    output = tmp_path / "out.json"

    command = [sys.executable, "-m", "monai.bundle", "run", "make_datalist"]
    command += ["--config_file", "configs/make_datalist.json", "--csv_path", str(csv_path)]
    command += ["--columns", "{'image':'path','subject':'id','age':'age','sex':'sex'}", "--output_path", str(output)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stdout + result.stderr
    records = load_datalist(output, "training") + load_datalist(output, "validation")
    assert sorted(r["subject"] for r in records) == ["s1", "s2", "s3"]
    assert all(os.path.isfile(r["image"]) for r in records)


@pytest.mark.parametrize("value", [True, 1, "true", "True", "yes", "1", " on "])
def test_as_flag_reads_the_yes_spellings_as_true(value):
    assert as_flag(value, "resume") is True


@pytest.mark.parametrize("value", [False, 0, "false", "False", "no", "0", "off"])
def test_as_flag_reads_the_no_spellings_as_false(value):
    # the bundle CLI passes `--resume false` through as the string "false", which Python would count as true
    assert as_flag(value, "resume") is False


@pytest.mark.parametrize("value", ["maybe", 2, None, [True]])
def test_as_flag_rejects_anything_else_naming_the_field(value):
    with pytest.raises(ValueError, match="resume must be true or false"):
        as_flag(value, "resume")

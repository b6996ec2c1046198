"""Specification of the bundle's MONAI transforms: covariate encoding, condition dropout, drifted noising, grayscale."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.networks.schedulers import DDPMScheduler

from scripts.core.covariates import CovariateEncoder, CovariateError, EncodeCovariatesd
from scripts.core.drift import LatentDrift
from scripts.core.transforms import ConditionDropoutd, DriftNoised
from scripts.io.transforms import ToGrayscaled

SCHEMA = {
    "age": {"type": "continuous", "range": [40, 100]},
    "sex": {"type": "binary", "categories": ["F", "M"]},
    "diagnosis": {"type": "categorical", "categories": ["CN", "MCI", "AD"]},
}
RECORD = {"age": 70, "sex": "M", "diagnosis": "MCI"}


@pytest.fixture
def encoder() -> CovariateEncoder:
    return CovariateEncoder(SCHEMA)


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False
    )


def drift_noise(delta: float = 0.0, seed: int = 0) -> DriftNoised:
    transform = DriftNoised(keys="latent", scheduler=scheduler(), drift=LatentDrift(delta))
    transform.set_random_state(seed=seed)
    return transform


# --- CovariateEncoder: encoding ---------------------------------------------------------------------------------


def test_encoding_lays_out_continuous_binary_one_hot_then_null_flag(encoder):
    expected = torch.tensor([0.5, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert torch.equal(encoder.encode(RECORD), expected)


def test_encoding_is_a_float32_vector_of_encoder_size(encoder):
    vector = encoder.encode(RECORD)
    assert vector.shape == (encoder.size,) and vector.dtype == torch.float32


def test_size_counts_one_per_scalar_one_per_category_and_the_null_flag(encoder):
    assert encoder.size == 1 + 1 + 3 + 1


def test_continuous_range_ends_map_to_zero_and_one(encoder):
    assert encoder.encode({**RECORD, "age": 40})[0] == 0.0
    assert encoder.encode({**RECORD, "age": 100})[0] == 1.0


def test_continuous_accepts_a_numeric_string(encoder):
    assert encoder.encode({**RECORD, "age": "70"})[0] == 0.5


@pytest.mark.parametrize(
    "value, expected", [("F", 0.0), ("M", 1.0), (0, 0.0), (1, 1.0), (False, 0.0), (True, 1.0)], ids=repr
)
def test_binary_accepts_category_names_zero_one_and_booleans(encoder, value, expected):
    assert encoder.encode({**RECORD, "sex": value})[1] == expected


def test_binary_without_categories_defaults_to_zero_and_one():
    encoder = CovariateEncoder({"smoker": {"type": "binary"}})
    assert encoder.encode({"smoker": 1}).tolist() == [1.0, 0.0]
    assert encoder.encode({"smoker": "0"}).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("diagnosis, index", [("CN", 0), ("MCI", 1), ("AD", 2)])
def test_categorical_is_one_hot_in_schema_order(encoder, diagnosis, index):
    one_hot = encoder.encode({**RECORD, "diagnosis": diagnosis})[2:5]
    assert torch.equal(one_hot, torch.nn.functional.one_hot(torch.tensor(index), 3).float())


def test_null_condition_has_flag_one_and_zeros_elsewhere(encoder):
    null = encoder.null()
    assert null.shape == (encoder.size,)
    assert null[-1] == 1.0 and not null[:-1].any()


def test_encoded_records_never_set_the_null_flag(encoder):
    assert encoder.encode(RECORD)[-1] == 0.0


def test_describe_gives_each_covariate_its_slice_of_the_vector(encoder):
    description = encoder.describe()
    slices = {name: entry["slice"] for name, entry in description["layout"].items()}
    assert description["size"] == 6
    assert slices == {"age": [0, 1], "sex": [1, 2], "diagnosis": [2, 5], "null_flag": [5, 6]}


def test_describe_keeps_each_covariate_definition(encoder):
    layout = encoder.describe()["layout"]
    assert layout["diagnosis"]["categories"] == ["CN", "MCI", "AD"]
    assert layout["age"]["range"] == [40, 100]


def test_covariate_with_default_may_be_missing():
    encoder = CovariateEncoder({**SCHEMA, "sex": {"type": "binary", "categories": ["F", "M"], "default": "F"}})
    assert torch.equal(encoder.encode({"age": 70, "diagnosis": "CN"}), torch.tensor([0.5, 0.0, 1.0, 0.0, 0.0, 0.0]))


# --- CovariateEncoder: record errors --------------------------------------------------------------------------------


def test_covariate_error_is_a_value_error():
    assert issubclass(CovariateError, ValueError)


def test_missing_covariate_error_names_field_and_source(encoder):
    with pytest.raises(CovariateError, match=r"sub-01\.nii\.gz.*'age'.*missing"):
        encoder.encode({"sex": "M", "diagnosis": "CN"}, source="sub-01.nii.gz")


def test_nan_covariate_counts_as_missing(encoder):
    with pytest.raises(CovariateError, match=r"'age'.*missing"):
        encoder.encode({**RECORD, "age": float("nan")})


def test_unknown_category_error_names_field_value_and_source(encoder):
    with pytest.raises(CovariateError, match=r"sub-01\.nii\.gz.*'diagnosis'.*'LMCI'.*unknown"):
        encoder.encode({**RECORD, "diagnosis": "LMCI"}, source="sub-01.nii.gz")


def test_unknown_binary_value_is_an_error(encoder):
    with pytest.raises(CovariateError, match=r"'sex'.*unknown"):
        encoder.encode({**RECORD, "sex": 2})


@pytest.mark.parametrize("age", [39.9, 100.5])
def test_out_of_range_error_names_field_range_and_source(encoder, age):
    with pytest.raises(CovariateError, match=r"sub-01\.nii\.gz.*'age'.*outside its range \[40, 100\]"):
        encoder.encode({**RECORD, "age": age}, source="sub-01.nii.gz")


def test_non_numeric_continuous_error_names_field_and_source(encoder):
    with pytest.raises(CovariateError, match=r"sub-01\.nii\.gz.*'age' must be a number"):
        encoder.encode({**RECORD, "age": "seventy"}, source="sub-01.nii.gz")


# --- CovariateEncoder: schema errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "ordinal"},
        {"type": "continuous"},
        {"type": "continuous", "range": [40]},
        {"type": "continuous", "range": [50, 50]},
        {"type": "continuous", "range": [100, 40]},
        {"type": "categorical", "categories": ["CN", "AD", "CN"]},
        {"type": "categorical", "categories": ["CN"]},
        {"type": "categorical"},
        {"type": "binary", "categories": ["F", "M", "X"]},
    ],
    ids=[
        "unknown-type",
        "missing-range",
        "short-range",
        "degenerate-range",
        "reversed-range",
        "duplicate-categories",
        "single-category",
        "missing-categories",
        "binary-with-three-categories",
    ],
)
def test_bad_schema_entry_raises_naming_the_covariate(spec):
    with pytest.raises(CovariateError, match=r"covariate_schema\['bmi'\]"):
        CovariateEncoder({"age": SCHEMA["age"], "bmi": spec})


@pytest.mark.parametrize("bounds", [["low", 100], [40, None]], ids=["text-bound", "null-bound"])
def test_non_numeric_range_bound_raises_naming_the_covariate(bounds):
    with pytest.raises(CovariateError, match=r"covariate_schema\['bmi'\]"):
        CovariateEncoder({"bmi": {"type": "continuous", "range": bounds}})


@pytest.mark.parametrize("schema", [{}, None, ["age"]], ids=["empty", "none", "list"])
def test_empty_or_non_mapping_schema_raises(schema):
    with pytest.raises(CovariateError, match="non-empty mapping"):
        CovariateEncoder(schema)


def test_schema_given_by_config_is_not_mutated():
    schema = {"smoker": {"type": "binary"}}
    CovariateEncoder(schema)
    assert schema == {"smoker": {"type": "binary"}}


# --- check_records ----------------------------------------------------------------------------------------------


def test_check_records_returns_the_records_when_all_encode(encoder):
    records = [{**RECORD, "image": "a.nii.gz"}, {**RECORD, "age": 55, "image": "b.nii.gz"}]
    assert encoder.check_records(records) == records


def test_check_records_error_names_record_index_and_image_path(encoder):
    records = [{**RECORD, "image": "a.nii.gz"}, {**RECORD, "diagnosis": "XX", "image": "scans/b.nii.gz"}]
    with pytest.raises(CovariateError, match=r"train\.json, record 1 \(scans/b\.nii\.gz\).*'diagnosis'"):
        encoder.check_records(records, source="train.json")


# --- EncodeCovariatesd ------------------------------------------------------------------------------------------


def test_encode_covariates_writes_a_1_by_size_condition(encoder):
    out = EncodeCovariatesd(encoder, output_key="condition")({**RECORD, "image": "a.nii.gz"})
    assert out["condition"].shape == (1, encoder.size)
    assert torch.equal(out["condition"][0], encoder.encode(RECORD))


def test_encode_covariates_reads_prefixed_keys(encoder):
    data = {f"target_{name}": value for name, value in RECORD.items()}
    out = EncodeCovariatesd(encoder, output_key="target_condition", prefix="target_")(data)
    assert torch.equal(out["target_condition"][0], encoder.encode(RECORD))


def test_encode_covariates_leaves_the_input_dict_untouched(encoder):
    data = {**RECORD, "image": "a.nii.gz"}
    EncodeCovariatesd(encoder)(data)
    assert "condition" not in data


def test_encode_covariates_error_names_the_image_path(encoder):
    with pytest.raises(CovariateError, match=r"scans/sub-07\.nii\.gz: covariate 'age'"):
        EncodeCovariatesd(encoder)({"sex": "F", "diagnosis": "AD", "image": "scans/sub-07.nii.gz"})


def test_encode_covariates_error_names_the_loaded_image_file(encoder):
    image = MetaTensor(torch.zeros(1, 4, 4), meta={"filename_or_obj": "/data/sub-07.png"})
    with pytest.raises(CovariateError, match=r"/data/sub-07\.png: covariate 'diagnosis'"):
        EncodeCovariatesd(encoder)({**RECORD, "diagnosis": "??", "image": image})


# --- ConditionDropoutd ------------------------------------------------------------------------------------------


def condition_sample(encoder: CovariateEncoder) -> dict:
    return {"condition": encoder.encode(RECORD).unsqueeze(0)}


def test_condition_dropout_with_prob_one_gives_the_null_condition(encoder):
    out = ConditionDropoutd("condition", encoder, prob=1.0)(condition_sample(encoder))
    assert torch.equal(out["condition"], encoder.null().unsqueeze(0))


def test_condition_dropout_with_prob_zero_keeps_the_condition(encoder):
    data = condition_sample(encoder)
    out = ConditionDropoutd("condition", encoder, prob=0.0)(data)
    assert torch.equal(out["condition"], data["condition"])


def test_condition_dropout_drops_about_prob_of_the_samples(encoder):
    dropout = ConditionDropoutd("condition", encoder, prob=0.5)
    dropout.set_random_state(seed=0)
    null = encoder.null().unsqueeze(0)
    draws = 2000
    dropped = sum(torch.equal(dropout(condition_sample(encoder))["condition"], null) for _ in range(draws))
    assert abs(dropped / draws - 0.5) < 0.05


@pytest.mark.parametrize("prob", [-0.1, 1.5])
def test_condition_dropout_rejects_prob_outside_unit_interval(encoder, prob):
    with pytest.raises(ValueError, match="prob must be in"):
        ConditionDropoutd("condition", encoder, prob=prob)


# --- DriftNoised --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 8, 8), (3, 4, 4, 4)], ids=["2d", "3d"])
def test_drift_noise_writes_noisy_target_and_one_timestep_per_sample(shape):
    out = drift_noise(0.1)({"latent": torch.randn(shape)})
    assert out["noisy"].shape == shape and out["target"].shape == shape
    assert out["timesteps"].shape == () and out["timesteps"].dtype == torch.int64


def test_drift_noise_timesteps_lie_in_the_training_range_and_vary_between_samples():
    transform = drift_noise(0.1)
    timesteps = torch.stack([transform({"latent": torch.randn(1, 2, 2)})["timesteps"] for _ in range(256)])
    assert timesteps.min() >= 0 and timesteps.max() < 1000
    assert len(timesteps.unique()) > 100


def test_drift_noise_is_reproducible_from_the_random_state():
    z0 = torch.randn(3, 8, 8)
    first, second = drift_noise(0.1, seed=3)({"latent": z0}), drift_noise(0.1, seed=3)({"latent": z0})
    for key in ("noisy", "target", "timesteps"):
        assert torch.equal(first[key], second[key])


def test_drift_noise_differs_between_random_states():
    z0 = torch.randn(3, 8, 8)
    first, second = drift_noise(0.1, seed=3)({"latent": z0}), drift_noise(0.1, seed=4)({"latent": z0})
    assert not torch.equal(first["noisy"], second["noisy"])
    assert not torch.equal(first["target"], second["target"])


def test_drift_noise_with_zero_delta_equals_monai_add_noise():
    z0 = torch.randn(3, 8, 8)
    out = drift_noise(0.0)({"latent": z0})
    expected = scheduler().add_noise(
        original_samples=z0[None], noise=out["target"][None], timesteps=out["timesteps"][None]
    )
    assert torch.equal(out["noisy"], expected[0])


def test_drift_noise_shifts_the_noise_by_delta_and_targets_the_undrifted_noise():
    z0 = torch.randn(3, 8, 8)
    out = drift_noise(0.1)({"latent": z0})
    t = out["timesteps"][None]
    expected = scheduler().add_noise(original_samples=z0[None], noise=out["target"][None] + 0.1, timesteps=t)
    assert torch.allclose(out["noisy"], expected[0], atol=1e-6)


def test_drift_noise_scales_the_cached_latent_first_and_the_clean_keys_alike():
    z0, source = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    scale = torch.tensor(0.5)  # the model's buffer: read at call time, so filling it later is seen
    transform = DriftNoised("latent", scheduler(), LatentDrift(0.0), scale=scale, also_scale="source")
    transform.set_random_state(seed=0)
    scale.fill_(0.7)
    out = transform({"latent": z0, "source": source})
    t = out["timesteps"][None]
    expected = scheduler().add_noise(original_samples=0.7 * z0[None], noise=out["target"][None], timesteps=t)
    assert torch.allclose(out["noisy"], expected[0], atol=1e-6)
    assert torch.equal(out["source"], source * 0.7)


def test_drift_noise_noises_one_key_and_names_a_missing_one():
    with pytest.raises(ValueError, match="one latent per sample"):
        DriftNoised(["a", "b"], scheduler(), LatentDrift(0.0))
    with pytest.raises(KeyError, match="EncodeLatentd"):
        drift_noise(0.1)({"image": torch.randn(1, 8, 8)})


def test_drift_noise_in_a_cached_chain_redraws_noise_every_epoch():
    """The stage-2 chain: CacheDataset keeps the deterministic encoding and redraws t and ε after it."""
    from monai.data import CacheDataset
    from monai.transforms import Compose, Lambdad

    encode = Lambdad("image", lambda x: x * 2.0, overwrite="latent")
    data = CacheDataset([{"image": torch.ones(3, 4, 4)}], Compose([encode, drift_noise(0.1)]), progress=False)
    first, second = data[0], data[0]
    assert torch.equal(first["latent"], second["latent"])
    assert not torch.equal(first["noisy"], second["noisy"])


# --- ToGrayscaled -------------------------------------------------------------------------------------------------


def test_rgb_image_becomes_one_channel_mean():
    rgb = torch.rand(3, 5, 5)
    out = ToGrayscaled("image")({"image": rgb})["image"]
    assert out.shape == (1, 5, 5)
    assert torch.allclose(out, rgb.mean(0, keepdim=True))


def test_rgba_image_becomes_the_mean_of_rgb_ignoring_alpha():
    rgba = torch.rand(4, 5, 5)
    out = ToGrayscaled("image")({"image": rgba})["image"]
    assert torch.allclose(out, rgba[:3].mean(0, keepdim=True))


def test_single_channel_image_is_unchanged():
    gray = torch.rand(1, 5, 5)
    assert torch.equal(ToGrayscaled("image")({"image": gray})["image"], gray)


def test_two_channel_image_raises_naming_the_channel_count():
    with pytest.raises(ValueError, match="got 2 channels"):
        ToGrayscaled("image")({"image": torch.rand(2, 5, 5)})

"""Benchmark: this bundle's training steps and counterfactual latency beside plain MONAI at the same settings.

Each measurement runs in its own spawned process (so its peak memory, VmHWM, is its own), builds the networks from
the bundle's configs for a modality (3D brain and 2D chest demo sizes), warms up, then times `repeats` runs and
keeps the median. The plain-MONAI baseline uses the same AutoencoderKL / DiffusionModelUNet with random weights:

- stage 1: AutoencoderKL, L1 + KL, Adam step (ours: `AutoencoderIteration`, the bundle's own stage-1 step);
- stage 2: `DDPMScheduler.add_noise` + DiffusionModelUNet on context tokens, MSE, Adam step (ours: drifted
  `DriftNoised` + `ConditionedUNet` on the covariate vector, as `LatentDiffusionPrepareBatch` does);
- counterfactual: encode, N DDIM inversion steps (`DDIMScheduler.reversed_step`), then
  `LatentDiffusionInferer.sample` with classifier-free guidance and decode (ours: `CounterfactualInferer` with the
  same steps and guidance, drift on, strength 1, no fixed-point refinement; and at the inference config's defaults).

Run: python -m monai.bundle run benchmark --config_file configs/benchmark.json (writes docs/performance.md + JSON).
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scripts.io.files import atomic_write, atomic_write_json

PRESETS = {"3d": "brain_mri_3d.json", "2d": "chest_xray_2d.json"}


def _parser(bundle_root: str, modality: str, workflow: str = "common.json"):
    """The preset's config: on top of common.json, or of a standalone workflow such as inference.json."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    files = [workflow, PRESETS[modality]]
    parser.read_config([str(Path(bundle_root) / "configs" / name) for name in files])
    parser["bundle_root"] = bundle_root
    return parser


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(function: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    for _ in range(warmup):
        function()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return {"seconds": statistics.median(seconds), "min_seconds": min(seconds), "repeats": repeats}


def _measure(task: str, bundle_root: str, modality: str, settings: dict, threads: int) -> dict[str, Any]:
    """One measurement in a fresh process: returns its timing and the process's peak memory."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    result = TASKS[task](bundle_root, modality, settings)
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return result


# ---------------------------------------------------------------------------------------------------------- stage 1
def _stage1(bundle_root: str, modality: str, settings: dict, ours: bool) -> dict[str, Any]:
    from types import SimpleNamespace

    from scripts.training.engines import AutoencoderIteration, kl_divergence

    parser = _parser(bundle_root, modality)
    autoencoder = parser.get_parsed_content("autoencoder_def")
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=1e-4)
    shape = settings["stage1_batch"]
    images = torch.rand(*shape)
    if ours:
        iteration = AutoencoderIteration(kl_weight=1e-6, adversarial_weight=0.0)
        state = SimpleNamespace(device=torch.device("cpu"), epoch=1)
        engine = SimpleNamespace(network=autoencoder, optimizer=optimizer, state=state)

        def step():
            iteration(engine, {"image": images})

    else:

        def step():
            optimizer.zero_grad(set_to_none=True)
            reconstruction, mu, sigma = autoencoder(images)
            loss = torch.nn.functional.l1_loss(reconstruction, images) + 1e-6 * kl_divergence(mu, sigma)
            loss.backward()
            optimizer.step()

    return {**_time(step, settings["repeats"]), "batch": list(shape)}


# ---------------------------------------------------------------------------------------------------------- stage 2
def _stage2(bundle_root: str, modality: str, settings: dict, ours: bool) -> dict[str, Any]:
    from monai.networks.schedulers import DDPMScheduler

    from scripts.core.drift import LatentDrift
    from scripts.core.transforms import DriftNoised

    parser = _parser(bundle_root, modality)
    batch = settings["stage2_batch_size"]
    latent_shape = parser.get_parsed_content("latent_shape")
    latents = torch.randn(batch, *latent_shape)
    scheduler: DDPMScheduler = parser.get_parsed_content("noise_scheduler")
    encoder = parser.get_parsed_content("covariate_encoder")
    if ours:
        denoiser = parser.get_parsed_content("denoiser")
        noising = DriftNoised("latent", scheduler, LatentDrift(settings["delta"]))
        condition = torch.rand(batch, 1, encoder.size)
        optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-4)

        def step():  # the per-sample transform as the training chain runs it, then the collated batch
            samples = [noising({"latent": latent}) for latent in latents]
            noised = {key: torch.stack([sample[key] for sample in samples]) for key in ("noisy", "target", "timesteps")}
            optimizer.zero_grad(set_to_none=True)
            output = denoiser(noised["noisy"], noised["timesteps"], condition)
            torch.nn.functional.mse_loss(output, noised["target"]).backward()
            optimizer.step()

    else:
        unet = parser.get_parsed_content("unet_def")
        context = torch.rand(batch, encoder.size, parser.get_parsed_content("cross_attention_dim"))
        optimizer = torch.optim.Adam(unet.parameters(), lr=1e-4)

        def step():
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.num_train_timesteps, (batch,))
            noisy = scheduler.add_noise(latents, noise, timesteps)
            optimizer.zero_grad(set_to_none=True)
            output = unet(noisy, timesteps, context=context)
            torch.nn.functional.mse_loss(output, noise).backward()
            optimizer.step()

    return {**_time(step, settings["repeats"]), "batch": [batch, *latent_shape]}


# --------------------------------------------------------------------------------------------------- counterfactual
def _counterfactual(bundle_root: str, modality: str, settings: dict, variant: str) -> dict[str, Any]:
    from scripts.core.inferers import CounterfactualInferer

    parser = _parser(bundle_root, modality, "inference.json")
    network = parser.get_parsed_content("network_def").eval()
    encoder = parser.get_parsed_content("covariate_encoder")
    scheduler = parser.get_parsed_content("inference_scheduler")
    image_size = parser.get_parsed_content("image_size")
    image = torch.rand(1, 1, *image_size)
    steps, guidance = settings["num_inference_steps"], settings["guidance_scale"]
    condition = torch.rand(1, 1, encoder.size)
    if variant == "baseline":
        from monai.inferers import LatentDiffusionInferer

        unet = network.denoiser.unet
        context = torch.rand(1, encoder.size, parser.get_parsed_content("cross_attention_dim"))
        inferer = LatentDiffusionInferer(scheduler, scale_factor=1.0)

        @torch.inference_mode()
        def run():
            latent = network.autoencoder.encode_stage_2_inputs(image)
            scheduler.set_timesteps(steps + 1)  # MONAI's own grid; its N + 1 points give N inversion steps
            for t in scheduler.timesteps.flip(0)[:-1]:
                output = unet(latent, t.reshape(1), context=context)
                latent, _ = scheduler.reversed_step(output, int(t), latent)
            scheduler.set_timesteps(steps)
            inferer.sample(
                input_noise=latent, autoencoder_model=network.autoencoder, diffusion_model=unet, scheduler=scheduler,
                conditioning=context, mode="crossattn", verbose=False, cfg=guidance,
            )  # fmt: skip

        parameters: dict[str, Any] = {"strength": 1.0, "fixed_point_iterations": 0}
    else:
        # "ours": the same chain as plain MONAI's; "defaults": the inference config's settings, including the
        # reference chain of the composition and the automatic mask; "defaults_raw": the same without them (the raw
        # decode, as before the composition existed)
        defaults = variant.startswith("defaults")
        composed = variant == "defaults"
        parameters = {
            "strength": parser.get_parsed_content("strength") if defaults else 1.0,
            "fixed_point_iterations": parser.get_parsed_content("fixed_point_iterations") if defaults else 0,
            "composition": parser.get_parsed_content("composition") if composed else "none",
            "auto_mask": parser.get_parsed_content("auto_mask") if composed else False,
        }
        inferer = CounterfactualInferer(
            scheduler, steps, guidance_scale=guidance, null_condition=encoder.null(), delta=settings["delta"],
            **parameters,
        )  # fmt: skip

        def run():
            inferer(image, network, condition, condition)

    result = _time(run, settings["latency_repeats"])
    if variant != "baseline":  # where the time goes: one more run with timing hooks on the parts
        result["profile"] = _profile(run, network.denoiser, network.autoencoder)
    return {**result, "image_size": list(image_size), "num_inference_steps": steps, **parameters}


def _profile(run: Callable[[], Any], denoiser: torch.nn.Module, autoencoder: torch.nn.Module) -> dict[str, Any]:
    """Seconds spent in the denoiser and in the autoencoder's encode/decode (and call counts) during one `run`."""
    spent = {"denoiser": [0.0, 0]}
    starts: dict[str, float] = {}
    handles = [
        denoiser.register_forward_pre_hook(lambda *_: starts.__setitem__("denoiser", time.perf_counter())),
        denoiser.register_forward_hook(lambda *_: _add(spent, "denoiser", starts)),
    ]
    wrapped = []
    for method in ("encode", "decode"):  # methods, not forward: timed by wrapping them on the instance
        original = getattr(autoencoder, method)
        wrapped.append(method)
        spent[f"autoencoder.{method}"] = [0.0, 0]

        def timed(*args, _original=original, _name=f"autoencoder.{method}", **kwargs):
            begin = time.perf_counter()
            output = _original(*args, **kwargs)
            spent[_name][0] += time.perf_counter() - begin
            spent[_name][1] += 1
            return output

        setattr(autoencoder, method, timed)
    try:
        begin = time.perf_counter()
        run()
        total = time.perf_counter() - begin
    finally:
        for handle in handles:
            handle.remove()
        for method in wrapped:
            delattr(autoencoder, method)
    profile = {name: {"seconds": round(value[0], 3), "calls": value[1]} for name, value in spent.items() if value[1]}
    profile["total_seconds"] = round(total, 3)
    profile["other_seconds"] = round(total - sum(value[0] for value in spent.values()), 3)
    return profile


def _add(spent: dict[str, list], name: str, starts: dict[str, float]) -> None:
    spent[name][0] += time.perf_counter() - starts[name]
    spent[name][1] += 1


def _full_resolution(bundle_root: str, modality: str, settings: dict, native: bool) -> dict[str, Any]:
    """
    A 1 mm brain volume (160x192x160) through the whole inference workflow (load, resample, counterfactual, undo
    the preprocessing, write) with untrained weights: either on the model's 3 mm grid (`native` False, the shipped
    setting: outputs come back on the 1 mm grid) or with the network itself run at 1 mm (`native` True; fewer steps,
    since memory does not grow with the number of steps).
    """
    import tempfile

    import nibabel as nib
    import numpy as np

    if modality != "3d":
        return {"seconds": float("nan"), "skipped": "3D only"}
    folder = Path(tempfile.mkdtemp(prefix="benchmark_"))
    shape = (160, 192, 160)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    volume = np.exp(-3 * (grid**2).sum(0)) * (1 + 0.1 * np.random.default_rng(0).standard_normal(shape))
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), folder / "brain_1mm.nii.gz")
    parser = _parser(bundle_root, modality, "inference.json")
    steps = settings["native_steps"] if native else settings["num_inference_steps"]
    parser.update({
        "image": str(folder / "brain_1mm.nii.gz"), "results_dir": str(folder / "out"), "progress": False,
        "num_inference_steps": steps, "source": {"age": 65, "sex": "F", "diagnosis": "CN"}, "target": {"age": 85},
    })  # fmt: skip
    if native:
        parser.update({"image_size": list(shape), "pixdim": [1.0, 1.0, 1.0]})
    try:
        evaluator = parser.get_parsed_content("evaluator")  # untrained weights: memory and time do not depend on them
        result = _time(evaluator.run, 1, warmup=0)
        written = sorted(path.name for path in (folder / "out").iterdir())
        output = nib.load(folder / "out" / "brain_1mm_counterfactual.nii.gz")
        image_size = parser.get_parsed_content("image_size")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {**result, "input_shape": list(shape), "output_shape": list(output.shape), "network_grid": image_size,
            "num_inference_steps": steps, "outputs": written}  # fmt: skip


TASKS: dict[str, Callable[[str, str, dict], dict]] = {
    "stage1_ours": lambda root, modality, settings: _stage1(root, modality, settings, True),
    "stage1_baseline": lambda root, modality, settings: _stage1(root, modality, settings, False),
    "stage2_ours": lambda root, modality, settings: _stage2(root, modality, settings, True),
    "stage2_baseline": lambda root, modality, settings: _stage2(root, modality, settings, False),
    "counterfactual_ours": lambda root, modality, settings: _counterfactual(root, modality, settings, "ours"),
    "counterfactual_baseline": lambda root, modality, settings: _counterfactual(root, modality, settings, "baseline"),
    "counterfactual_defaults": lambda root, modality, settings: _counterfactual(root, modality, settings, "defaults"),
    "counterfactual_defaults_raw": lambda root, modality, settings: _counterfactual(
        root, modality, settings, "defaults_raw"
    ),
    "full_resolution_input": lambda root, modality, settings: _full_resolution(root, modality, settings, False),
    "full_resolution_native": lambda root, modality, settings: _full_resolution(root, modality, settings, True),
}
DEFAULT_SETTINGS = {
    "3d": {"stage1_batch": [4, 1, 32, 32, 32], "stage2_batch_size": 8},
    "2d": {"stage1_batch": [8, 1, 128, 128], "stage2_batch_size": 16},
}


def run_benchmark(
    bundle_root: str = ".",
    output_dir: str = "docs",
    modalities: tuple[str, ...] = ("3d", "2d"),
    repeats: int = 5,
    latency_repeats: int = 7,
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    delta: float = 0.1,
    threads: int | None = None,
    tasks: tuple[str, ...] = tuple(TASKS),
    native_steps: int = 4,
) -> dict[str, Any]:
    """Run every task for every modality, each in a fresh process; write performance.json and performance.md."""
    unknown = sorted(set(modalities) - set(PRESETS)) + sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown modality or task {unknown}; choose from {sorted(PRESETS)} and {sorted(TASKS)}.")
    threads = threads or torch.get_num_threads()
    context = multiprocessing.get_context("spawn")
    results: dict[str, Any] = {"machine": machine(threads), "modalities": {}}
    for modality in modalities:
        settings = {
            **DEFAULT_SETTINGS[modality], "repeats": repeats, "latency_repeats": latency_repeats,
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "delta": delta,
            "native_steps": native_steps,
        }  # fmt: skip
        measured: dict[str, Any] = {}
        for task in tasks:
            if task.startswith("full_resolution") and modality != "3d":
                continue
            with context.Pool(1) as pool:  # a fresh process per measurement: its own peak memory
                measured[task] = pool.apply(_measure, (task, bundle_root, modality, settings, threads))
            print(
                f"{modality} {task}: {measured[task]['seconds']:.3f} s, {measured[task]['peak_rss_mb']} MB", flush=True
            )
        results["modalities"][modality] = {"settings": settings, "results": measured, "ratios": ratios(measured)}
    output = Path(output_dir)
    atomic_write_json(results, output / "performance.json")
    atomic_write(output / "performance.md", lambda path: Path(path).write_text(report(results)), ".md")
    return results


def ratios(measured: dict[str, Any]) -> dict[str, float]:
    """ours / baseline time for each pair measured (1.02 = 2% slower than plain MONAI)."""
    pairs = {
        "stage1": ("stage1_ours", "stage1_baseline"),
        "stage2": ("stage2_ours", "stage2_baseline"),
        "counterfactual": ("counterfactual_ours", "counterfactual_baseline"),
    }
    return {
        name: round(measured[a]["seconds"] / measured[b]["seconds"], 3)
        for name, (a, b) in pairs.items()
        if a in measured and b in measured
    }


def machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    import monai

    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": threads, "memory_gib": memory,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Performance",
        "",
        "Measured by `python -m monai.bundle run benchmark --config_file configs/benchmark.json`",
        "(scripts/experiments/benchmark.py); raw numbers in `performance.json`. Median of the timed repeats after one",
        "warm-up; every row is a fresh process, so peak memory (VmHWM, resident) is that measurement's own, Python",
        "and torch included.",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['torch_threads']} torch threads), "
        f"{m['memory_gib']} GiB RAM, GPU: {m['gpu'] or 'none'}; Python {m['python']}, torch {m['torch']}, "
        f"MONAI {m['monai']}; {m['date']}.",
        "",
    ]
    for modality, block in results["modalities"].items():
        s = block["settings"]
        lines += [
            f"## {'3D brain' if modality == '3d' else '2D chest X-ray'} (demo size)",
            "",
            "| measurement | this bundle (s) | plain MONAI (s) | ratio | peak memory ours / MONAI (MB) |",
            "|---|---|---|---|---|",
        ]
        r = block["results"]
        names = {"stage1": "stage-1 training step", "stage2": "stage-2 training step", "counterfactual": None}
        for key, name in names.items():
            ours, base = r.get(f"{key}_ours"), r.get(f"{key}_baseline")
            if not ours or not base:
                continue
            if name is None:
                name = f"counterfactual, {s['num_inference_steps']} inversion + {s['num_inference_steps']} sampling "
                name += f"steps, guidance {s['guidance_scale']}, {'x'.join(map(str, ours['image_size']))}"
            ratio = block["ratios"][key]
            lines.append(
                f"| {name} | {ours['seconds']:.3f} | {base['seconds']:.3f} | {ratio:.3f} | "
                f"{ours['peak_rss_mb']:.0f} / {base['peak_rss_mb']:.0f} |"
            )
        if "profile" in r.get("counterfactual_ours", {}):
            p = r["counterfactual_ours"]["profile"]
            parts = ", ".join(f"{name} {v['seconds']:.2f} s ({v['calls']} calls)" for name, v in p.items()
                              if isinstance(v, dict))  # fmt: skip
            lines += ["", f"Where the counterfactual's time goes (one profiled run, {p['total_seconds']:.2f} s): "
                      f"{parts}; everything else (scheduler steps, drift, guidance arithmetic) "
                      f"{p['other_seconds']:.2f} s."]  # fmt: skip
        if "counterfactual_defaults" in r:
            d = r["counterfactual_defaults"]
            lines += [
                "",
                f"At the inference config's defaults (strength {d['strength']}, fixed-point iterations "
                f"{d['fixed_point_iterations']}, {s['num_inference_steps']} steps, guidance {s['guidance_scale']}): "
                f"{d['seconds']:.2f} s per counterfactual, peak {d['peak_rss_mb']:.0f} MB.",
            ]
            if "counterfactual_defaults_raw" in r:
                raw = r["counterfactual_defaults_raw"]
                lines[-1] += (
                    f" With composition {d['composition']!r} and the automatic mask (the reference chain batched "
                    f"with the counterfactual chain) against the raw decode without them ({raw['seconds']:.2f} s): "
                    f"{d['seconds'] / raw['seconds']:.2f}x."
                )
        for key, label in (("full_resolution_input", "model's 3 mm grid"), ("full_resolution_native", "1 mm grid")):
            if key in r:
                f = r[key]
                lines += [
                    "",
                    f"A 1 mm volume {'x'.join(map(str, f['input_shape']))} through the whole inference workflow, "
                    f"network on the {label} ({'x'.join(map(str, f['network_grid']))}), "
                    f"{f['num_inference_steps']} steps: {f['seconds']:.1f} s, peak {f['peak_rss_mb']:.0f} MB; output "
                    f"{'x'.join(map(str, f['output_shape']))}.",
                ]
        lines += [
            "",
            f"Stage 1 batch {r.get('stage1_ours', {}).get('batch')}, stage 2 batch "
            f"{r.get('stage2_ours', {}).get('batch')} (latents), delta {s['delta']}, fp32.",
            "",
        ]
    return "\n".join(lines).rstrip("\n") + "\n"  # one final newline (the Model Zoo's end-of-file check)

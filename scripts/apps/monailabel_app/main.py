"""MONAI Label app serving the bundle's counterfactuals: one infer task per modality preset, on the shipped weights."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

from counterfactual_task import CounterfactualInferTask
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

logger = logging.getLogger(__name__)

# model name in MONAI Label -> modality preset (configs/<preset>.json)
PRESETS = {"counterfactual_brain": "brain_mri_3d", "counterfactual_chest": "chest_xray_2d"}


class LatentDriftCounterfactualApp(MONAILabelApp):
    """
    App options (`monailabel start_server --conf NAME VALUE`):

    - bundle_root: the bundle folder (configs/, models/, scripts/); default: the bundle this app sits in.
    - models: comma-separated models to serve, from counterfactual_brain, counterfactual_chest; default both.
    - results_dir: where each model's outputs (counterfactual, difference, montage, record) are kept;
      default <bundle_root>/eval/monailabel/<preset>.
    - datalist: a MONAI datalist giving the source covariates of the studies' images; default
      <studies>/datalist.json when it exists.
    """

    def __init__(self, app_dir: str, studies: str, conf: Mapping[str, str]) -> None:
        conf = dict(conf or {})
        default_root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, os.pardir)
        self.bundle_root = os.path.realpath(conf.get("bundle_root") or default_root)
        self.models = [name.strip() for name in conf.get("models", ",".join(PRESETS)).split(",") if name.strip()]
        unknown = sorted(set(self.models) - set(PRESETS))
        if unknown or not self.models:
            raise ValueError(f"app option 'models': unknown {unknown or 'empty'}; choose from {sorted(PRESETS)}.")
        with open(os.path.join(self.bundle_root, "configs", "metadata.json"), encoding="utf-8") as file:
            metadata = json.load(file)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Latent Drift counterfactuals",
            description="Counterfactual images under target covariates (Latent Drifting, CVPR 2025)",
            version=metadata["version"],
        )

    def init_infers(self) -> dict[str, InferTask]:
        datalist = self.conf.get("datalist") or os.path.join(self.studies, "datalist.json")
        datalist = datalist if os.path.isfile(datalist) else None
        if self.conf.get("datalist") and datalist is None:
            raise FileNotFoundError(f"app option 'datalist': no file at {self.conf['datalist']!r}.")
        tasks: dict[str, InferTask] = {}
        for name in self.models:
            preset = PRESETS[name]
            results_dir = os.path.join(self.conf["results_dir"], preset) if self.conf.get("results_dir") else None
            tasks[name] = CounterfactualInferTask(self.bundle_root, self.conf, preset, results_dir, datalist)
            logger.info(f"+++ Adding Inferer:: {name} => {tasks[name].description}")
        return tasks

"""The world as a TFDS dataset in array_record format, readable without TensorFlow.

    path = prepare_tfds("~/tfds")                       # .../jaxsr_world/seed0/1.0.0
    src = tfds.builder_from_directory(path).as_data_source(split="ift")
    src[0]   # {"prompt": b"List 3 ...", "response": b"...", ...}: Text features come back as bytes

One schema serves every split (TFDS has one feature dict per builder); columns a split lacks are
empty strings and ``score`` is -1 there (``ift`` responses are perfect: 5). The seed is the builder config (``seed<k>``), so worlds
of different seeds live side by side in one data_dir.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from .data import world_records

TFDS_SPLITS = ("ift", "eft", "eval")


class JaxsrWorld(tfds.core.GeneratorBasedBuilder):
    """IFT, EFT and eval splits of the verifiable instruction world (docs/world.md)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="seed0", description="world seed 0")]
    # TFDS derives code_path for a builder inside a package through the `importlib_resources`
    # backport, which tensorflow-datasets 4.9 does not install; naming the file skips that lookup.
    code_path = epath.Path(__file__)

    def __init__(self, *, seed: int = 0, sizes: dict | None = None, **kwargs):
        self._seed, self._sizes = seed, dict(sizes or {})
        # Sizes other than the defaults are part of the name, so a prepared directory is never
        # silently reused for a request of another size.
        name = "_".join([f"seed{seed}"] + [f"{k.removeprefix('num_')}{v}" for k, v in sorted(self._sizes.items())])
        known = {c.name for c in self.BUILDER_CONFIGS}  # TFDS refuses a custom config named like a listed one
        config = name if name in known else tfds.core.BuilderConfig(name=name, description=f"world {name}")
        kwargs.setdefault("config", config)
        kwargs.setdefault("file_format", "array_record")  # random access, no TensorFlow
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=self) rather than dataset_info_from_configs, which looks for package
        # metadata a builder outside the TFDS catalogue does not have (LIBRARY_NOTES.md §1).
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict({
                "prompt": text, "response": text, "instruction": text, "candidate": text, "spec": text,
                "score": np.int32,
            }),
            homepage="https://arxiv.org/abs/2401.10020",
        )

    def _split_generators(self, dl_manager):
        records = world_records(self._seed, **self._sizes)
        return {name: self._generate_examples(name, records[name]) for name in TFDS_SPLITS}

    def _generate_examples(self, split: str, rows: list[dict]):
        for i, row in enumerate(rows):
            out = {"prompt": "", "response": "", "instruction": "", "candidate": "", "spec": "", "score": -1}
            if split == "ift":
                out.update(prompt=row["prompt"], response=row["response"], instruction=row["prompt"], spec=row["spec"],
                           score=5)
            elif split == "eft":
                out.update({k: row[k] for k in ("prompt", "response", "instruction", "candidate", "spec", "score")})
            else:
                out.update(prompt=row["instruction"], instruction=row["instruction"], spec=row["spec"])
            yield f"{split}-{i}", out


def prepare_tfds(data_dir, seed: int = 0, **sizes) -> str:
    """Build the splits under ``data_dir`` (once; a prepared seed is reused) and return the dataset dir."""
    builder = JaxsrWorld(data_dir=str(data_dir), seed=seed, sizes=sizes)
    builder.download_and_prepare()
    return str(builder.data_dir)


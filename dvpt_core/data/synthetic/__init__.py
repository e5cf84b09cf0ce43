"""Built-in synthetic datasets, written in the on-disk formats real users hold.

``generate_dataset`` writes the one ``data.format`` names: DR grading in DDR's layout,
polyp-like segmentation in Kvasir-SEG's, cardiac-like MRI volumes in ACDC's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dvpt_core.config import ExperimentConfig
from dvpt_core.data.synthetic.acdc import generate_acdc
from dvpt_core.data.synthetic.ddr import generate_ddr
from dvpt_core.data.synthetic.kvasir import generate_kvasir

GENERATORS: dict[str, Callable[[Path, ExperimentConfig, bool], None]] = {
    "ddr": lambda root, cfg, overwrite: generate_ddr(root, cfg.synthetic, cfg.data.class_names, overwrite),
    "kvasir": lambda root, cfg, overwrite: generate_kvasir(root, cfg.synthetic, overwrite),
    "acdc": lambda root, cfg, overwrite: generate_acdc(root, cfg.synthetic, overwrite),
}


def generate_dataset(root: Path, cfg: ExperimentConfig, overwrite: bool = False) -> None:
    """Write the synthetic dataset of ``cfg.data.format`` to ``root`` (see ``GENERATORS``)."""
    try:
        generate = GENERATORS[cfg.data.format]
    except KeyError:
        raise ValueError(
            f"no synthetic dataset in format data.format={cfg.data.format!r}; available: {', '.join(GENERATORS)}"
        ) from None
    generate(Path(root), cfg, overwrite)

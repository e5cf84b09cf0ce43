"""KFP v2 lightweight Python components: thin typed wrappers over ``dvpt_core.steps``.

The components are built by :func:`build_components` rather than decorated at import time, so the
container image is chosen when a pipeline is compiled (``--image`` or ``$DVPT_IMAGE``) and
importing this package has no side effects. Every component runs in the one project image, which
already has this package and kfp installed, so KFP is told not to pip-install anything at start.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from kfp import dsl
from kfp.dsl.python_component import PythonComponent

from components import steps

IMAGE_ENV = "DVPT_IMAGE"
DEFAULT_IMAGE = "dvpt-mlops:0.1.0"
HELPERS = (steps._log_scalars, steps._image_page)


def default_image() -> str:
    """``$DVPT_IMAGE`` (the image pushed to the user's registry) or the local build's tag."""
    return os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


@dataclass(frozen=True)
class StepComponents:
    """The six components of the DVPT pipeline, in pipeline order."""

    validate: PythonComponent
    preprocess: PythonComponent
    train: PythonComponent
    evaluate: PythonComponent
    export: PythonComponent
    register: PythonComponent


def build_components(image: str | None = None) -> StepComponents:
    """Every step as a component running in ``image`` (default: :func:`default_image`)."""
    image = image or default_image()

    def make(func: Callable) -> PythonComponent:
        return dsl.component(func, base_image=image, install_kfp_package=False, additional_funcs=list(HELPERS))

    return StepComponents(
        validate=make(steps.validate),
        preprocess=make(steps.preprocess),
        train=make(steps.train),
        evaluate=make(steps.evaluate),
        export=make(steps.export),
        register=make(steps.register),
    )

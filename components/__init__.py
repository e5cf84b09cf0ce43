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

from components import compare, steps

IMAGE_ENV = "DVPT_IMAGE"
DEFAULT_IMAGE = "dvpt-mlops:0.1.0"
HELPERS = (steps._log_scalars, steps._image_page, steps._weights_note, steps._data_root, steps._describe_model)


def default_image() -> str:
    """``$DVPT_IMAGE`` (the image pushed to the user's registry) or the local build's tag."""
    return os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


@dataclass(frozen=True)
class StepComponents:
    """The components of the DVPT pipeline, in pipeline order (predict: batch inference):
    the run's configuration, the dataset from the DVC remote, the steps, and the launcher that
    trains in a Training Operator PyTorchJob instead of its own pod."""

    configure: PythonComponent
    resolve_data: PythonComponent
    fetch_data: PythonComponent
    pretrain: PythonComponent
    validate: PythonComponent
    preprocess: PythonComponent
    train: PythonComponent
    train_pytorchjob: PythonComponent
    evaluate: PythonComponent
    export: PythonComponent
    register: PythonComponent
    promote: PythonComponent
    predict: PythonComponent


@dataclass(frozen=True)
class CompareComponents:
    """The comparison pipeline's own components; its other tasks are :class:`StepComponents`."""

    cell_config: PythonComponent
    compare: PythonComponent


def _component(func: Callable, image: str | None) -> PythonComponent:
    return dsl.component(func, base_image=image or default_image(), install_kfp_package=False,
                         additional_funcs=list(HELPERS))


def build_components(image: str | None = None) -> StepComponents:
    """Every step as a component running in ``image`` (default: :func:`default_image`)."""
    return StepComponents(
        configure=_component(steps.configure, image),
        resolve_data=_component(steps.resolve_data, image),
        fetch_data=_component(steps.fetch_data, image),
        pretrain=_component(steps.pretrain, image),
        validate=_component(steps.validate, image),
        preprocess=_component(steps.preprocess, image),
        train=_component(steps.train, image),
        train_pytorchjob=_component(steps.train_pytorchjob, image),
        evaluate=_component(steps.evaluate, image),
        export=_component(steps.export, image),
        register=_component(steps.register, image),
        promote=_component(steps.promote, image),
        predict=_component(steps.predict, image),
    )


def build_compare_components(image: str | None = None) -> CompareComponents:
    """The comparison's own components in ``image``, as :func:`build_components`."""
    return CompareComponents(cell_config=_component(compare.cell_config, image),
                             compare=_component(compare.compare, image))

"""The run's start: every option checked, the engine settings fixed for every task."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fastvideo.fastvideo_args import FastVideoArgs, SamplingParam
from fastvideo.jobs.items import ItemSpec, RunContext
from fastvideo.jobs.options import EngineOptions
from fastvideo.models.loader.component_loader import check_model_files, read_model_index
from fastvideo.pipelines.builder import check_device_available, pipeline_class
from fastvideo.pipelines.composed_pipeline_base import ComposedPipelineBase
from fastvideo.storage import StoreError, StoreUnavailableError, model_fingerprint, retry_io
from tasks.common import get_store
from tasks.dispatch import Dispatch

_WRITE_CHECK_KEY = ".fastvideo-write-check"


@task(name="prepare-run", cache_policy=NO_CACHE, persist_result=False)
def prepare_run(model_path: str, store_uri: str, output_uri: str, defaults: SamplingParam,
                checkpoint_every: int = 5, device: str | None = None, dtype: str | None = None,
                fps: int = 16, denoise_device: str | None = None,
                denoise_dtype: str | None = None, dispatch: Dispatch | None = None,
                options: EngineOptions | None = None, training_data: bool = False
                ) -> RunContext:
    """Fix the engine settings every task of the run shares, and fingerprint the model
    where this machine can see it.

    With every stage on a GPU target (placement `all`), they all run on `device`,
    default CUDA (bf16); on a GPU deployment the model path is the GPU node's, so this
    (possibly GPU-less, weightless) machine neither checks nor fingerprints it.
    Otherwise denoising takes `denoise_device`/`denoise_dtype`; unset, it runs like the
    other stages, except on the GPU pool: then on CUDA, whatever this machine has.
    """
    dispatch = dispatch or Dispatch()
    options = options or EngineOptions()
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    remote_node = dispatch.mode == "deployment"
    # Every stage on the GPU pool: the model path is the GPU node's, not this machine's.
    weightless = remote_node and dispatch.remote_stages
    if dispatch.remote_stages:
        if denoise_device is not None or denoise_dtype is not None:
            raise ValueError("denoise_device/denoise_dtype split the stages between two "
                             "devices: use them with placement 'denoise'; with placement "
                             "'all' every stage runs on --device")
        if remote_node and device is None:
            device = "cuda"
        denoise_device, denoise_dtype = device, dtype
    path = model_path if weightless else str(Path(model_path).resolve())
    args = FastVideoArgs(model_path=path, dtype=dtype, **({"device": device} if device else {}))
    if denoise_device is None:
        denoise_device = "cuda" if remote_node else args.device
    if denoise_dtype is None and denoise_device == args.device:
        denoise_dtype = args.dtype
    denoise_args = FastVideoArgs(model_path=path, device=denoise_device, dtype=denoise_dtype)
    for uri in dict.fromkeys((output_uri, store_uri)):
        check_writable(uri)
    if not weightless:
        # Fail now, not in the first task: this node runs the stages.
        check_model_folder(model_path)
        check_model_files(path)
        check_options_fit_model(path, options)
        check_device_available(args.device)
        if not remote_node:
            check_device_available(denoise_args.device)
    return RunContext(model_path=path,
                      model_fingerprint=None if weightless else model_fingerprint(path),
                      store_uri=store_uri, output_uri=output_uri, device=args.device,
                      dtype=args.dtype, denoise_device=denoise_args.device,
                      denoise_dtype=denoise_args.dtype,
                      negative_prompt=defaults.negative_prompt or "",
                      max_sequence_length=defaults.max_sequence_length,
                      checkpoint_every=checkpoint_every, fps=fps, options=options,
                      training_data=training_data)


def check_options_fit_model(model_path: str, options: EngineOptions) -> None:
    """Fail the run at its start when an engine option needs what the model's DiT lacks
    (step caching), not in every item."""
    if options.step_cache_threshold is None:
        return
    from fastvideo.models.dits.step_cache import check_supported
    from fastvideo.models.registry import resolve_model

    library, class_name = read_model_index(model_path).get("transformer") or (None, None)
    if class_name is None:
        raise ValueError(f"step_cache_threshold is set but {model_path} has no transformer")
    check_supported(resolve_model(class_name, library).load_class(),
                    options.step_cache_threshold)


def check_writable(uri: str) -> None:
    """Fail the run at its start when a store it writes to refuses a write (a read-only
    folder, S3 credentials that may only read), not after the first item is computed."""
    try:
        store = get_store(uri)
        retry_io(lambda: store.put_bytes(_WRITE_CHECK_KEY, b""))
        retry_io(lambda: store.delete(_WRITE_CHECK_KEY))
    except StoreUnavailableError:
        raise  # transient: not the store's setup
    except (OSError, StoreError) as exc:
        raise ValueError(f"cannot write to {uri}: {exc}") from None


def check_requests(ctx: RunContext, items: list[ItemSpec]) -> None:
    """Fail the run at its start when its items do not fit the model: images for a
    text-to-video model, or none for an image-to-video one (where this machine sees the
    model; else the GPU node fails each such item with the same message)."""
    if ctx.model_fingerprint is None:
        return
    cls = pipeline_class(ctx.model_path)
    with_image = [i.item_id for i in items if i.image is not None]
    if cls.requires_image and len(with_image) < len(items):
        missing = [i.item_id for i in items if i.image is None]
        cls.check_image_given(None, f"{len(missing)} item(s) (first: {missing[0]!r})")
    if not cls.requires_image and with_image:
        first = next(i for i in items if i.image is not None)
        cls.check_image_given(first.image, f"{len(with_image)} item(s) (first: "
                                           f"{first.item_id!r})")


def check_model_folder(model_path: str) -> str:
    """`model_path` resolved, once it is known to be a Diffusers folder."""
    path = Path(model_path).resolve()
    if not (path / "model_index.json").is_file():
        raise ValueError(f"model_path {model_path!r} is not a Diffusers model folder "
                         "(no model_index.json)")
    return str(path)


def request_defaults(model_path: str, dispatch: Dispatch, given: dict[str, Any]
                     ) -> tuple[SamplingParam, int]:
    """The run's request defaults, and its frame rate: the options given (None: unset) over
    the model family's (`default_sampling` and `fps` of the model's pipeline). A run whose
    model only the GPU node sees (placement `all` on a deployment) takes `SamplingParam`'s
    own defaults for what it leaves unset."""
    family, fps = ComposedPipelineBase.default_sampling, ComposedPipelineBase.fps
    weightless = dispatch.mode == "deployment" and dispatch.remote_stages
    if not weightless:
        cls = pipeline_class(check_model_folder(model_path))
        family, fps = cls.default_sampling, cls.fps
    values = {k: v for k, v in given.items() if v is not None}
    return dataclasses.replace(family, **values), fps

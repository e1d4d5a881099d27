"""A run's checkpoints read back without training: its saved config, and its model on one device.

For what uses a run but does not resume it: sampling, evaluation, export, and a fine-tuning run
that takes the architecture of its own checkpoint. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import orbax.checkpoint as ocp
from etils import epath

from nanojaxgpt import config as config_lib
from nanojaxgpt.checkpoint import ITEMS, CheckpointError, checkpoint_dir
from nanojaxgpt.config import Config, ModelConfig


def _reader(run_dir: str) -> ocp.CheckpointManager:
    directory = checkpoint_dir(run_dir)
    if not epath.Path(run_dir).exists():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not directory.exists():
        raise CheckpointError(f"{run_dir} holds no checkpoints ({directory} does not exist)")
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def _step_or_latest(mngr: ocp.CheckpointManager, run_dir: str, step: int | None) -> int:
    steps = mngr.all_steps()
    if step is None and steps:
        return max(steps)
    if step is not None and step in steps:
        return step
    raise CheckpointError(f"no complete checkpoint{'' if step is None else f' of step {step}'} "
                          f"in {checkpoint_dir(run_dir)}; complete ones: {sorted(steps)}")


def _read_config(mngr: ocp.CheckpointManager, step: int) -> Config:
    saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    return config_lib.from_dict(dict(saved), source="saved config")


def read_config(run_dir: str, step: int | None = None) -> Config:
    """The resolved config saved with a checkpoint (default: the latest complete one)."""
    mngr = _reader(run_dir)
    try:
        return _read_config(mngr, _step_or_latest(mngr, run_dir, step))
    finally:
        mngr.close()


def load_model(run_dir: str, *, step: int | None = None,
               abstract: Callable[[ModelConfig], eqx.Module] | None = None
               ) -> tuple[eqx.Module, Config]:
    """The model of a checkpoint (default: the latest) on one device, for sampling or export,
    and the run's config saved with it (read once, for both).

    Reads only the `model` subtree of the state: the optimizer moments (2/3 of it) stay on disk.
    `abstract(model_config)`: the module with its arrays as ShapeDtypeStructs (default:
    nanojaxgpt.model.abstract_model).
    """
    from nanojaxgpt import model  # the model code is needed only to sample, not to train-resume

    abstract = abstract or model.abstract_model
    mngr = _reader(run_dir)
    try:
        step = _step_or_latest(mngr, run_dir, step)
        cfg = _read_config(mngr, step)
        params, static = eqx.partition(abstract(cfg.model), model.is_param)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              params, is_leaf=model.is_param)
        item = {"model": params}
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot load the model of step {step} from "
                              f"{checkpoint_dir(run_dir)}: {type(e).__name__}: {e}") from e
    finally:
        mngr.close()
    return eqx.combine(restored.state["model"], static), cfg

"""Every config group option composes with every built-in plugin and instantiates (lightning-hydra-template style)."""
import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from sciml import plugins, searchpath
from sciml.optim.factory import build_optimizer, build_scheduler
from sciml.run import _strategy, hand_shapes_to_model


def _compose(tmp_path, *overrides):
    searchpath.register()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sciml.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize("plugin", plugins.installed())
@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "lars", "lamb"])
@pytest.mark.parametrize("scheduler", ["none", "cosine", "warmup_poly"])
def test_optimizer_and_scheduler_options(tmp_path, plugin, optimizer, scheduler):
    cfg = _compose(tmp_path, f"+plugin={plugin}", f"optimizer={optimizer}", f"scheduler={scheduler}")
    hand_shapes_to_model(cfg, instantiate(cfg.data))  # the data's row shape becomes model.input_shape, as in a run
    model = instantiate(cfg.model)
    opt = build_optimizer(cfg.optimizer, model, global_batch=512)
    assert type(opt).__name__ == {"sgd": "SGD", "adamw": "AdamW", "lars": "LARS", "lamb": "LAMB"}[optimizer]
    build_scheduler(cfg.scheduler, opt, total_steps=100, steps_per_epoch=10)


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "[csv,tensorboard]"])
def test_trainer_callbacks_loggers_instantiate(tmp_path, logger):
    cfg = _compose(tmp_path, "+plugin=hep", f"logger={logger}")
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, strategy=_strategy(cfg.strategy))
    assert trainer.default_root_dir == str(tmp_path)
    assert len(trainer.checkpoint_callbacks) == 2
    assert len(trainer.loggers) == (2 if "," in logger else 1)
    assert cfg.objective == "val/auc_best" and cfg.monitor == "val/auc"


def test_plugin_is_not_in_the_defaults_list(tmp_path):
    cfg = _compose(tmp_path)
    assert "plugin" not in cfg.hydra.runtime.choices and "data" not in cfg

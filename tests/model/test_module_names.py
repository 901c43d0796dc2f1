"""The modules renamed for what they hold (weights.py: model weights in and out; model_config.py:
NiTConfig and its presets) still answer to their former names, as the same module objects."""
import importlib


def test_former_module_names_are_the_renamed_modules():
    for old, new in (("nit_model.checkpoint", "nit_model.weights"), ("nit_model.config", "nit_model.model_config")):
        assert importlib.import_module(old) is importlib.import_module(new), old


def test_names_import_from_both_paths():
    from nit_model.checkpoint import load_model, save_weights
    from nit_model.config import PRESETS, NiTConfig
    from nit_model.model_config import NiTConfig as NewConfig
    from nit_model.weights import load_model as new_load, save_weights as new_save
    assert NiTConfig is NewConfig and load_model is new_load and save_weights is new_save
    assert "NiT-S" in PRESETS and NiTConfig.from_name("tiny").hidden_size > 0

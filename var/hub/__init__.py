"""Checkpoint loading and saving: released files of each model family, this project's safetensors, strict checks.

* :mod:`var.hub.io`: the one state-dict reader (training wrappers unwrapped in :data:`~var.hub.io.UNWRAP_ORDER`,
  EMA weights first), strict loading that names missing/unexpected keys, ``save_pretrained``/``load_pretrained``.
* :mod:`var.hub.download`: released file names -> local files through ``huggingface_hub`` (the ``[hub]`` extra).
* One module per family converts its released files: :mod:`var.hub.var` (``load_var``), :mod:`var.hub.llamagen`
  (``load_llamagen``, ``load_nar``, ``load_t2i_bundle``), :mod:`var.hub.infinity` (``load_infinity``).
"""
from var.hub.download import download_released, resolve_checkpoint
from var.hub.io import (UNWRAP_ORDER, build_on_meta, check_finite_weights, config_from_dict, count_indexed,
                        expect_type, load_pretrained, load_strict, read_config_json, read_state_dict, require_keys,
                        save_pretrained, saved_model_classes)
from var.hub.infinity import load_bsq_vae, load_infinity, load_infinity_transformer
from var.hub.llamagen import (RELEASED_LLAMAGEN, gpt_config_from_state_dict, is_t2i_state_dict, load_llamagen,
                              load_llamagen_gpt, load_llamagen_vq, load_nar, load_t2i_bundle,
                              read_llamagen_state_dict, resolve_llamagen_checkpoint, vq_config_from_state_dict)
from var.hub.var import (RELEASED_VAR, create_pretrained, load_var, load_var_tokenizer,
                         load_var_transformer, resolve_var_checkpoint, var_config_from_state_dict,
                         vqvae_config_from_state_dict)

__all__ = ["UNWRAP_ORDER", "build_on_meta", "check_finite_weights", "config_from_dict", "count_indexed", "create_pretrained", "download_released", "expect_type",
           "gpt_config_from_state_dict", "is_t2i_state_dict", "load_bsq_vae", "load_infinity",
           "load_infinity_transformer", "load_llamagen", "load_nar", "load_t2i_bundle", "load_llamagen_gpt", "load_llamagen_vq", "load_pretrained",
           "load_strict", "load_var", "load_var_tokenizer", "load_var_transformer", "read_llamagen_state_dict",
           "read_config_json", "read_state_dict", "require_keys", "resolve_checkpoint", "resolve_llamagen_checkpoint",
           "resolve_var_checkpoint", "save_pretrained", "saved_model_classes", "var_config_from_state_dict",
           "vq_config_from_state_dict", "vqvae_config_from_state_dict", "RELEASED_LLAMAGEN",
           "RELEASED_VAR"]

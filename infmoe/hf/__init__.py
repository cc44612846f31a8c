"""Hugging Face format: export infmoe models for `transformers`, read them back, import
GPT-2, and upcycle a dense model into ∞-MoE.

An export folder (``infmoe export CKPT --hf DIR``, or `export_hf`) holds:

- config.json: model_type "infmoe", every `GPTConfig` field (ffn, ffn_options, ...), the
  ∞-MoE knobs ``n_samples`` (K) and ``mode`` at the top level, and an ``auto_map`` to
- configuration_infmoe.py, modeling_infmoe.py: `InfmoeConfig` and `InfmoeForCausalLM`, a
  `PreTrainedModel` + `GenerationMixin` that wraps our GPT, beside the modules of infmoe they
  need (infmoe_layers_topk_moe.py, ...). All are generated from our source at export time
  (`infmoe.hf.standalone`) and import only the standard library, torch and transformers:
  one model definition, no hand-written copy to drift from it;
- model.safetensors: the weights, named ``transformer.<our name>`` (the tied head once);
- tokenizer.json, tokenizer_config.json: a `PreTrainedTokenizerFast` with
  ``<|endoftext|>`` as bos/eos/unk (tiktoken's GPT-2 converted to the same ids);
- generation_config.json: bos/eos/pad = ``<|endoftext|>``.

Loading it needs only torch and transformers, not infmoe:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)        # no network
    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, n_samples=4, mode="sample")
    AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)

or, where infmoe is installed, without trust_remote_code after ``infmoe.hf.register()``
(which registers the in-repo classes, built on `infmoe.models.GPT`). (AutoTokenizer reads
config.json first; without either, transformers asks on a terminal whether to run the
custom code; answering no still loads the tokenizer, which is plain.) lm-evaluation-harness
loads an export with ``--model hf --model_args pretrained=DIR,trust_remote_code=True``.

`generate()` keeps keys and values in transformers' `DynamicCache` (see modeling_infmoe).
Limits, from our GPT: right padding only (batched generation of prompts of unequal length,
which pads on the left, raises: generate them one at a time); prompt + new tokens <= n_ctx.

`load_hf_dir`, `import_gpt2` and `upcycle_to_infmoe` do not need `transformers`.

The names below load on first use (`infmoe.lazy`): `import infmoe.hf` needs no
`transformers`, and `infmoe.loading`, which imports `infmoe.hf.reading`, does not run
`infmoe.hf.export`, which imports `infmoe.loading`.
"""

from __future__ import annotations

from infmoe.lazy import lazy_exports

_EXPORTS = {
    "infmoe.hf.configuration_infmoe": ("InfmoeConfig",),
    "infmoe.hf.export": ("export_hf", "save_hf"),
    "infmoe.hf.gpt2": ("config_name", "import_gpt2"),
    "infmoe.hf.modeling_infmoe": ("InfmoeForCausalLM",),
    "infmoe.hf.reading": ("is_hf_export", "load_hf_dir"),
    "infmoe.hf.upcycle": ("upcycle_to_infmoe",),
}
__all__ = [
    "InfmoeConfig", "InfmoeForCausalLM", "config_name", "export_hf", "import_gpt2", "is_hf_export",
    "load_hf_dir", "register", "save_hf", "upcycle_to_infmoe",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


def register() -> None:
    """Register "infmoe" with transformers' `AutoConfig` and `AutoModelForCausalLM`, so
    that they load an export without trust_remote_code. Safe to call more than once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from infmoe.hf.configuration_infmoe import InfmoeConfig
    from infmoe.hf.modeling_infmoe import InfmoeForCausalLM

    AutoConfig.register(InfmoeConfig.model_type, InfmoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(InfmoeConfig, InfmoeForCausalLM, exist_ok=True)


"""Modality routing (notebook 06, `ol.modality`): do experts specialise by modality? The same prompts as text,
as speech and as an image, and their run through the selective thinker (prompts.py); which experts each modality
uses and what masking the most specific ones costs (analysis.py). docs/DESIGN.md's "Modality routing" is the
design. Both modules' names are reachable here (`ol.modality.build_prompts`, `ol.modality.masking_experiment`)."""

from omnilab.experiments.modality.analysis import (expert_modality_table, mask_setting, masked_share,
                                                   masking_experiment, modality_overlap, random_experts,
                                                   single_modality_experts, specific_experts, summarize,
                                                   text_documents, text_nll)
from omnilab.experiments.modality.prompts import (EOS, MANIFEST, MANIFEST_KEYS, MODALITIES, PROMPTS, FormPrompt, Item,
                                                  budget_beside_towers, build_prompts, collate, extend, form_prompt,
                                                  load_manifest, run_prompts, tower_bytes)

__all__ = [
    "MODALITIES", "MANIFEST", "MANIFEST_KEYS", "EOS", "PROMPTS", "Item", "tower_bytes", "budget_beside_towers",
    "load_manifest", "FormPrompt", "extend", "form_prompt", "build_prompts", "collate", "run_prompts",
    "expert_modality_table", "single_modality_experts", "modality_overlap", "specific_experts", "random_experts",
    "mask_setting", "masked_share", "text_documents", "text_nll", "masking_experiment", "summarize",
]

"""The reference-free preference losses of TRL 1.16, fed our pre-tokenized pairs: ORPO (trl.experimental.orpo) and
SimPO (trl.experimental.cpo's CPOTrainer with loss_type "simpo"), with the recipes' atomic checkpoints.

Both trainers tokenize text themselves (`tokenize_row`: "prompt + answer" re-tokenized, a BOS/EOS added when the
tokenizer has them). Our rows are token ids already, rendered by the recipe's prompt format and tokenized as its SFT
step (preference/pairs.py), so `tokenize_row` is replaced: prompt + answer, cut at max_length like the DPO path,
labels -100 on the prompt — the same scored tokens as DPO.

One change to TRL's ORPO: its NLL (SFT) term scores the whole chosen row, prompt included (orpo_trainer.py: "orpo
chosen nll loss is computed over the full prompt and response"); here it scores the answer only, as the SFT recipes
(and CPO/SimPO's own NLL term) do. The odds-ratio term is TRL's, unchanged.
"""
import warnings

import torch.nn.functional as F

from tuning.checkpoints import AtomicCheckpoints

with warnings.catch_warnings():  # "APIs here are unstable": known, and pinned (trl==1.16.0); not the user's to act on
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

__all__ = ["CPOConfig", "ORPOConfig", "PreferenceORPOTrainer", "PreferenceSimPOTrainer", "pair_features"]


def pair_features(row: dict, max_length: int) -> dict:
    """A row {prompt_ids, chosen_ids, rejected_ids} as the experimental trainers' collator reads it: per answer the
    whole sequence (prompt + answer, cut at max_length) and its labels (-100 on the prompt)."""
    prompt = list(row["prompt_ids"])
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        ids = (prompt + list(row[f"{side}_ids"]))[:max_length]
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = [1] * len(ids)
        out[f"{side}_labels"] = [-100] * len(prompt) + ids[len(prompt):]
    return out


class _PretokenizedPairs(AtomicCheckpoints):
    """tokenize_row of ORPOTrainer / CPOTrainer over pre-tokenized rows (module docstring)."""

    def tokenize_row(self, feature, model=None) -> dict:
        missing = [k for k in ("prompt_ids", "chosen_ids", "rejected_ids") if k not in feature]
        if missing:
            raise ValueError(f"expected pre-tokenized rows (preference.pairs), missing {missing}")
        return pair_features(feature, self.max_length)


class PreferenceORPOTrainer(_PretokenizedPairs, ORPOTrainer):
    """ORPO: NLL of the chosen answer − beta · log σ(log odds(chosen) − log odds(rejected)), no reference model."""

    def concatenated_forward(self, model, batch):
        joined = self.concatenated_inputs(batch, padding_value=self.padding_value, device=self.accelerator.device)
        n = batch["chosen_labels"].shape[0]
        logits = model(joined["concatenated_input_ids"], attention_mask=joined["concatenated_attention_mask"],
                       use_cache=False).logits
        labels = joined["concatenated_labels"]
        chosen_nll = F.cross_entropy(logits[:n, :-1].flatten(0, 1), labels[:n, 1:].flatten(), ignore_index=-100)
        logps = self.get_batch_logps(logits, labels, average_log_prob=True)  # per-token mean, as TRL's ORPO
        return logps[:n], logps[n:], logits[:n, :-1], logits[n:, :-1], chosen_nll


class PreferenceSimPOTrainer(_PretokenizedPairs, CPOTrainer):
    """SimPO: −log σ(beta · (mean log p(chosen) − mean log p(rejected)) − gamma), no reference model (TRL's
    CPOTrainer, loss_type "simpo", cpo_alpha 0: no added NLL term)."""

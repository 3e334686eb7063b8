"""Generation for ChatGLM-6B on transformers 5: the original's input preparation and mask/position growth,
`chat()` / `stream_chat()` with the `[Round i]` prompt and response post-processing, and the NaN/inf guard.

transformers 5 refuses attention masks that are not 2-D in `generate`, so the tokenizer's bool GLM mask
[B, 1, L, L] travels under its own name (`glm_attention_mask`) through the generation loop.
"""
import queue
import threading

import torch
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging

from .masks import next_position_ids
from .text import build_prompt, process_response  # noqa: F401  (torch-free: the data step and serving use them)

logger = logging.get_logger(__name__)

GLM_MASK_KWARG = "glm_attention_mask"


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """If any score is NaN or inf, zero them all and put 5e4 on id 5 (`▁`), so generation continues harmlessly."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if torch.isnan(scores).any() or torch.isinf(scores).any():
            scores.zero_()
            scores[..., 5] = 5e4
        return scores


class _QueueStreamer(BaseStreamer):
    def __init__(self):
        self.items = queue.Queue()

    def put(self, value):
        self.items.put(value)

    def end(self):
        self.items.put(None)


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatGLMGenerationMixin(GenerationMixin):
    def generate(self, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None, **kwargs):
        mask = kwargs.pop("attention_mask", None)
        if mask is not None:
            if mask.dtype == torch.bool and mask.dim() == 4:
                kwargs[GLM_MASK_KWARG] = mask
            else:
                # As the original: only the bool GLM mask is used; any other mask is dropped.
                logger.warning_once(f"The dtype of attention mask ({mask.dtype}) is not bool: ignored, the GLM mask "
                                    "is built from input_ids")
        return super().generate(inputs=inputs, generation_config=generation_config, logits_processor=logits_processor,
                                stopping_criteria=stopping_criteria, **kwargs)

    def _validate_model_kwargs(self, model_kwargs):
        model_kwargs.pop(GLM_MASK_KWARG, None)  # a copy; peft's wrapper hides our prepare_inputs signature
        super()._validate_model_kwargs(model_kwargs)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        return None  # GLM positions come from the ids (or the caller), never from a padding mask

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # [B, 2, L] positions are batch-first (the base class would expand 3-D positions on dim 1).
        positions = model_kwargs.pop("position_ids", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        if positions is not None and expand_size > 1:
            positions = positions.repeat_interleave(expand_size, dim=0)
        model_kwargs["position_ids"] = positions
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, position_ids=None,
                                      glm_attention_mask=None, use_cache=None, **kwargs):
        mask = glm_attention_mask
        if mask is None and attention_mask is not None and attention_mask.dtype == torch.bool and \
                attention_mask.dim() == 4:
            mask = attention_mask
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            # Decoding step: the last token, the mask's last row, [mask position, block position].
            if position_ids is not None:
                position_ids = position_ids[..., -1:]
            else:
                position_ids = next_position_ids(input_ids, self.config)
            input_ids = input_ids[:, -1:]
            mask = mask[:, :, -1:] if mask is not None else None
        inputs = {"input_ids": input_ids, "past_key_values": past_key_values, "position_ids": position_ids,
                  "attention_mask": mask, "use_cache": use_cache}
        for key in ("output_attentions", "output_hidden_states"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        model_kwargs["past_key_values"] = getattr(outputs, "past_key_values", None)
        mask = model_kwargs.get(GLM_MASK_KWARG)
        if mask is not None:
            # New column masked for the old rows; the new row copies the last one and sees itself.
            mask = torch.cat((mask, mask.new_ones((*mask.shape[:3], 1))), dim=3)
            row = mask[:, :, -1:].clone()
            row[..., -1] = False
            model_kwargs[GLM_MASK_KWARG] = torch.cat((mask, row), dim=2)
        positions = model_kwargs.get("position_ids")
        if positions is not None:
            new = positions[..., -1:].clone()
            if positions.dim() == 3:
                new[:, 1] += 1  # block position counts on; the token position stays the mask position
            model_kwargs["position_ids"] = torch.cat((positions, new), dim=-1)
        flat = model_kwargs.get("attention_mask")  # generate's own 2-D mask: kept consistent, never used
        if flat is not None:
            model_kwargs["attention_mask"] = torch.cat((flat, flat.new_ones((flat.shape[0], 1))), dim=-1)
        return model_kwargs

    # ---- chat ---------------------------------------------------------------------------------------------------
    process_response = staticmethod(process_response)

    def _chat_inputs(self, tokenizer, query, history, logits_processor):
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        inputs = tokenizer([build_prompt(query, history)], return_tensors="pt").to(self.device)
        return inputs, processors

    @torch.no_grad()
    def chat(self, tokenizer, query: str, history=None, max_length: int = 2048, num_beams: int = 1,
             do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95, logits_processor=None, **kwargs):
        history = list(history or [])
        inputs, processors = self._chat_inputs(tokenizer, query, history, logits_processor)
        outputs = self.generate(**inputs, max_length=max_length, num_beams=num_beams, do_sample=do_sample,
                                top_p=top_p, temperature=temperature, logits_processor=processors, **kwargs)
        response = process_response(tokenizer.decode(outputs[0, inputs["input_ids"].shape[1]:].tolist()))
        return response, history + [(query, response)]

    @torch.no_grad()
    def stream_chat(self, tokenizer, query: str, history=None, max_length: int = 2048, do_sample: bool = True,
                    top_p: float = 0.7, temperature: float = 0.95, logits_processor=None, **kwargs):
        """Yields (response so far, history with it) after every generated token."""
        history = list(history or [])
        inputs, processors = self._chat_inputs(tokenizer, query, history, logits_processor)
        prompt_length = inputs["input_ids"].shape[1]
        for ids in self.stream_generate(**inputs, max_length=max_length, do_sample=do_sample, top_p=top_p,
                                        temperature=temperature, logits_processor=processors, **kwargs):
            response = process_response(tokenizer.decode(ids[0, prompt_length:].tolist()))
            yield response, history + [(query, response)]

    def stream_generate(self, input_ids, stopping_criteria=None, **kwargs):
        """Like the original: yields prompt + the ids generated so far after every step. `generate` runs in a
        worker thread feeding a streamer; leaving the loop early stops it at the next step."""
        streamer = _QueueStreamer()
        abandoned = threading.Event()
        criteria = StoppingCriteriaList(stopping_criteria or [])
        criteria.append(_StopWhenSet(abandoned))
        errors = []

        def run():
            try:
                self.generate(input_ids=input_ids, streamer=streamer, stopping_criteria=criteria, **kwargs)
            except BaseException as exc:  # re-raised in the consumer
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        ids = None
        try:
            while (item := streamer.items.get()) is not None:
                if ids is None:
                    ids = item  # the prompt comes first
                    continue
                ids = torch.cat((ids, item[:, None].to(ids.dtype)), dim=-1)
                yield ids.to(input_ids.device)
        finally:
            abandoned.set()
            worker.join()
        if errors:
            raise errors[0]

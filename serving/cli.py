"""Streaming for the recipes' command-line chats (glm4_finetune/inference.py, llama_ner/chat_ner.py) through the
serving engine: the same sampling as `model.generate` (transformers' processors in its order, its default
top_k=50 when sampling, the global RNG that `set_seed` seeds), so a seeded answer is the text it was before,
now printed as it comes."""
from .engine import Delta, Engine, Finished
from .loading import wrap_loaded
from .sampling import SamplingParams

_ENGINES: dict[int, Engine] = {}


def engine_for(model, tokenizer, prompt_format: str) -> Engine:
    """One engine per loaded model object (a CLI loads one model and asks it many times)."""
    key = id(model)
    if key not in _ENGINES:
        _ENGINES[key] = Engine(wrap_loaded(model, tokenizer, prompt_format), max_batch=1, max_queue=1)
    return _ENGINES[key]


def generate_streamed(model, tokenizer, prompt_ids: list[int], *, prompt_format: str, on_delta=None,
                      max_new_tokens: int = 256, do_sample: bool = True, temperature: float = 1.0,
                      top_p: float = 1.0, top_k: int = 50, repetition_penalty: float = 1.0, num_beams: int = 1,
                      ) -> Finished:
    """Generate for one prompt; `on_delta(Delta)` sees the text as it comes. `generate`'s keyword names."""
    if num_beams != 1:
        raise ValueError("streaming generates with num_beams=1")
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_p=top_p, top_k=top_k if do_sample else 0, repetition_penalty=repetition_penalty)
    for event in engine_for(model, tokenizer, prompt_format).generate(prompt_ids=prompt_ids, params=params):
        if isinstance(event, Delta):
            if on_delta is not None:
                on_delta(event)
        elif event.finish_reason == "error":
            raise RuntimeError(f"generation failed: {event.error}")
        else:
            return event

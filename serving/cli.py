"""Streaming for the recipes' command-line chats (glm4_finetune/inference.py, llama_ner/chat_ner.py) through the
serving engine: the same sampling as `model.generate` (transformers' processors in its order, its default
top_k=50 when sampling, the global RNG that `set_seed` seeds), so a seeded answer is the text it was before,
now printed as it comes."""
import atexit

from .engine import Delta, Engine, Finished
from .loading import wrap_loaded
from .sampling import SamplingParams

class _CliEngine:
    """The engine of the model a CLI loaded, asked many times; asked for another model (or another tokenizer or
    prompt format), it closes the old engine first. Compared by identity, never by id(): an id can be reused once a
    model is freed, and the old engine must not outlive its model. Closed at exit."""

    def __init__(self):
        self.key, self.engine = None, None

    def get(self, model, tokenizer, prompt_format: str) -> Engine:
        key = (model, tokenizer, prompt_format)
        if (self.engine is None or self.engine.stats()["closed"] or model is not self.key[0]
                or tokenizer is not self.key[1] or prompt_format != self.key[2]):
            self.close()
            self.engine = Engine(wrap_loaded(model, tokenizer, prompt_format), max_batch=1, max_queue=1)
            self.key = key
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close(timeout=1.0)
        self.key, self.engine = None, None


_CLI_ENGINE = _CliEngine()
atexit.register(_CLI_ENGINE.close)


def engine_for(model, tokenizer, prompt_format: str) -> Engine:
    """One engine for the loaded model (a CLI loads one model and asks it many times)."""
    return _CLI_ENGINE.get(model, tokenizer, prompt_format)


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

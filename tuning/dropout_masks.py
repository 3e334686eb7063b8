"""Opt-in, CPU only: draw the LoRA dropout masks of a training step on a helper thread while the model computes.

PyTorch draws CPU random numbers one element at a time on one core (`bernoulli_` is a serial kernel). With LoRA
dropout on seven projections per layer that is a quarter of a small decoder's LoRA training step on 2 cores, while the
other core waits. Here, as soon as a training forward starts, a helper thread makes the step's masks - the same
`bernoulli_` calls on the same shapes and dtypes, in the same order, from the same generator - and every LoRA
dropout takes its mask when it gets there. The masks, the losses and the generator's state after the step are
bit-identical to ordinary dropout (tests/test_dropout_masks.py).

The shapes come from the first training forward, which runs ordinary dropout and records, for every call, the
features, the dtype and which dimension of `input_ids` each leading dimension is. Refused where this would not hold:
on a GPU, with gradient checkpointing (its re-forward draws again) and when anything else in the forward draws
random numbers (another dropout with p > 0, attention dropout).
"""
import queue
import threading

import torch

from .errors import UserError

FLAG = "prefetch_dropout_masks"
_RANDOM_CONFIG_KEYS = ("attention_dropout", "hidden_dropout", "attn_dropout", "resid_pdrop", "embd_pdrop",
                       "attn_pdrop", "dropout")


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x * mask  # F.dropout on CPU: input * (bernoulli(keep) / keep), the same product and backward


def _draw(shape, dtype, keep: float) -> torch.Tensor:
    mask = torch.empty(shape, dtype=dtype).bernoulli_(keep)
    return mask.div_(keep)


class _MaskPlan:
    """Records the dropout calls of one forward, then draws them ahead for every later forward."""

    def __init__(self):
        self.calls = None        # [(leading dims as positions in input_ids.shape, features, dtype, keep)]
        self.recording = None    # the calls of the forward being recorded, or None when it cannot be planned
        self.ids_shape = None
        self.mode = None         # None (outside a forward), "record" or "ahead"
        self.masks = None
        self.thread = None

    def start(self, ids_shape) -> None:
        self.discard()  # what an interrupted forward left behind
        self.ids_shape = tuple(ids_shape)
        if self.calls is None:
            # A forward whose input_ids dimensions are all different tells which one each mask dimension is.
            self.mode = "record"
            self.recording = [] if len(set(self.ids_shape)) == len(self.ids_shape) else None
            return
        self.mode = "ahead"
        self.masks = queue.Queue()
        jobs = [(tuple(self.ids_shape[i] for i in lead) + (features,), dtype, keep)
                for lead, features, dtype, keep in self.calls]

        def draw_all(out=self.masks):
            try:
                for shape, dtype, keep in jobs:
                    out.put(_draw(shape, dtype, keep))
            except BaseException as error:  # handed to the forward, which raises it
                out.put(error)

        self.thread = threading.Thread(target=draw_all, name="dropout-masks", daemon=True)
        self.thread.start()

    def apply(self, index: int, keep: float, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "ahead":
            mask = self.masks.get()
            if isinstance(mask, BaseException):
                raise mask
            if mask.shape != x.shape or mask.dtype != x.dtype:
                raise RuntimeError(f"dropout masks out of step: LoRA dropout {index} got a {tuple(x.shape)} "
                                   f"{x.dtype} input, the mask drawn for it is {tuple(mask.shape)} {mask.dtype}; "
                                   "turn --prefetch_dropout_masks off")
            return _masked(x, mask)
        if self.mode == "record" and self.recording is not None:
            lead = []
            for size in x.shape[:-1]:
                where = [i for i, s in enumerate(self.ids_shape) if s == size]
                if len(where) != 1:
                    self.recording = None  # not expressible in input_ids dimensions: plan another forward
                    break
                lead.append(where[0])
            else:
                self.recording.append((tuple(lead), x.shape[-1], x.dtype, keep))
        return _masked(x, _draw(x.shape, x.dtype, keep))

    def discard(self) -> None:
        if self.thread is not None:
            self.thread.join()
        self.thread = self.masks = self.recording = self.mode = None

    def finish(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            left = self.masks.qsize()
            self.masks = None
            if left:
                self.mode = None
                raise RuntimeError(f"dropout masks out of step: the forward used {left} fewer LoRA dropout masks "
                                   "than the first one; turn --prefetch_dropout_masks off")
        if self.mode == "record" and self.recording:
            self.calls = self.recording
        self.mode, self.recording = None, None


class PrefetchedDropout(torch.nn.Module):
    """nn.Dropout whose mask comes from the plan (drawn ahead on the helper thread)."""

    def __init__(self, p: float, plan: _MaskPlan, index: int):
        super().__init__()
        self.p, self.plan, self.index = p, plan, index

    def forward(self, x):
        if not self.training:
            return x
        if self.plan.mode is None:  # called outside the planned model's forward: ordinary dropout
            return torch.nn.functional.dropout(x, self.p, True)
        return self.plan.apply(self.index, 1.0 - self.p, x)

    def extra_repr(self) -> str:
        return f"p={self.p}, masks drawn ahead"


def refuse_off_cpu(device_type: str) -> None:
    """The flag is for CPU training; recipes call this before loading anything."""
    if device_type != "cpu":
        raise UserError("is for CPU training: the GPU draws random numbers in parallel already", field=FLAG)


def prefetch_dropout_masks(model) -> int:
    """Install on `model` (a peft LoRA model, before any wrapper); returns the number of LoRA dropouts taken over."""
    params = list(model.parameters())
    if params:
        refuse_off_cpu(params[0].device.type)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    checkpointing = getattr(base, "is_activation_checkpointing", None)  # transformers 5's name
    if checkpointing is None:
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    if checkpointing:
        raise UserError("cannot be used with gradient checkpointing (its re-forward draws the masks again)", field=FLAG)
    config = getattr(base, "config", None)
    for key in _RANDOM_CONFIG_KEYS:
        value = getattr(config, key, 0)
        if isinstance(value, (int, float)) and value > 0:
            raise UserError(f"the model draws random numbers of its own in the forward ({key}={value})", field=FLAG)
    plan, taken = _MaskPlan(), 0
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            parent_name, _, key = name.rpartition(".")
            if not parent_name.endswith("lora_dropout"):
                raise UserError(f"the model has a dropout of its own with p > 0 ({name})", field=FLAG)
            if module.p >= 1:
                continue
            model.get_submodule(parent_name)[key] = PrefetchedDropout(module.p, plan, taken)
            taken += 1
    if not taken:
        return 0

    def before(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training and isinstance(ids, torch.Tensor):
            plan.start(ids.shape)
        else:
            plan.discard()

    def after(module, args, kwargs, output):
        plan.finish()

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)
    return taken

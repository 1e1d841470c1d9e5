"""One-token decode steps, fast: a static KV cache and the step compiled by torch.compile (inductor), as gpt-fast does.

The compiled path ("compiled static cache"): the prompt is prefilled eagerly into a transformers `StaticCache`
(its tensors have a fixed shape and address, so one compiled graph serves every step), then each step runs the
whole forward (every layer, the packed kernels inside, the LM head) as one inductor graph without Python in
between. A graph is specialised on the cache length, so lengths are rounded up to `CACHE_BUCKET` and each bucket is
compiled once per process: `Decoder.compile_seconds` says how long that took, apart from any timed decoding.
One exception: a dense float32 LM head runs after the graph on oneDNN (`onednn_head`; `Decoder.head_kernel` says
so). torch's float32 matmul calls MKL, whose matrix-vector product streams ~19 GB/s on this AMD CPU against ~53 GB/s
for oneDNN's (SmolLM2's 49152×576 head, 2 threads, measured), and the head is the largest matrix a step reads.
A packed head (quantize `lm_head`) stays inside the graph on its own low-bit kernel, which reads a quarter of the
float32 bytes (8-bit); `head_kernel` then names that kernel.
Attention of a one-token step with grouped KV heads (SmolLM2: 9 query heads share 3 KV heads) runs as one SDPA call
over the KV heads as they are (`enable_gqa`, `grouped_decode_attention`): transformers' SDPA attention repeats the
cached keys and values to one copy per query head when compiled with a mask, which copies the whole static cache of
every layer on every step (SmolLM2, cache 256, 1 thread: 59 µs per layer against 25). The compiled decoder switches a
model on "sdpa" attention to it; prefill and multi-token steps still run transformers' own function, and the results
are the same (tests/inference/test_decode.py).

The plain path ("plain"): the model's eager forward with whatever cache it is given (a `DynamicCache` by default,
any transformers `Cache` works). It runs when compiling is switched off, when the cache given is not a static one,
and as the fallback when torch.compile or inductor fails (no C++ compiler, an unsupported operator):
`Decoder.note` then holds the one-line reason. `Decoder.path` always says which path ran.

Results: both paths compute the same forward, but the compiled graph fuses and reorders float operations and the
static cache attends over masked empty slots, so logits agree to rounding, not bit for bit; greedy tokens agree
until two candidates are within rounding of each other (tests/inference/test_decode.py checks them equal on tiny
models).
"""

from __future__ import annotations

import time
import types
import weakref

import torch
from torch import nn
from torch.utils.mkldnn import MkldnnLinear
from transformers import AttentionInterface, Cache, DynamicCache, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from slimlm.progress import progress_bar
from slimlm.storage import StoredModule

COMPILED = "compiled static cache"
PLAIN = "plain"
CACHE_BUCKET = 256  # static cache lengths are multiples of this: fewer compiled graphs, little wasted attention
_WARM_UP_STEPS = 2  # the first step compiles; the second checks the graph is reused (no recompile per call)


def cache_length(tokens: int) -> int:
    """The static cache length that holds `tokens` tokens: rounded up to a whole bucket."""
    return max(1, -(-tokens // CACHE_BUCKET)) * CACHE_BUCKET


def last_logits(model, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    """The forward of one prefill or decode step: float32 logits [batch, vocab] of the last position, the cache
    extended in place (only the last position's logits are computed, as generate() does)."""
    logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1].float()


def last_hidden(model, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    """A step without the LM head: the final (normed) hidden state of the last position [batch, hidden]."""
    return model.base_model(input_ids=input_ids, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]


ONEDNN_HEAD = "oneDNN float32 linear (torch.utils.mkldnn)"
GROUPED_SDPA = "slimlm_grouped_sdpa"
# freezing: the weights become constants of the graph, which lets max_autotune time inductor's own C++ GEMM templates
# against aten's kernels per shape and keep the faster (SmolLM2, 1 thread: the W4 int4pack matmuls 20 -> 15 µs on
# average; decode W4 + W8 head 110 -> 136 tok/s, float32 29 -> 51). The cost: a longer first compile (~60 s here,
# cached on disk for later processes) and, for dense float32 Linears, a second copy of their weights in oneDNN's
# layout (SmolLM2 float32: peak RSS 1.3 -> 2.5 GB); packed modules are not copied.
# Set as inductor's configuration while the graph compiles and first runs (`inductor_settings`), not as
# torch.compile options: given as options, the templates measured ~25 % slower here (1 thread: 113 against 129-150
# tok/s), apparently because part of the autotuning runs after the options' scope has closed.
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True}


def inductor_settings(tuned: bool = True):
    """The context in which the decode graphs are compiled and warmed up (INDUCTOR_OPTIONS; none if not `tuned`)."""
    import torch._inductor.config

    return torch._inductor.config.patch(INDUCTOR_OPTIONS if tuned else {})


def grouped_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except that a one-query step with grouped KV heads hands the KV heads to SDPA
    unrepeated (enable_gqa; module docstring). Same signature and result as `sdpa_attention_forward`."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_decode_attention)
# the masks SDPA takes (an implementation without a registered mask gets none: a static cache's empty slots would
# then be attended to)
ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)


@torch.no_grad()
def onednn_head(model) -> nn.Module | None:
    """The LM head on oneDNN when it is a dense float32 Linear on CPU (module docstring), holding its own copy of the
    weight in oneDNN's layout; None otherwise. Only for models whose logits are the head's output as it is (the
    LLaMA family slimlm supports: no logit scaling or soft-capping)."""
    head = model.get_output_embeddings()
    plain_logits = not any(getattr(model.config, key, None) for key in ("final_logit_softcapping", "logit_scale"))
    dense_float32 = type(head) is nn.Linear and head.weight.dtype == torch.float32 and head.weight.device.type == "cpu"
    if not (plain_logits and dense_float32 and torch.backends.mkldnn.is_available()):
        return None
    return MkldnnLinear(head, torch.float32)


def _own_copy(function):
    """`function` with a code object of its own. Dynamo keeps compiled graphs, and counts recompiles against its
    limit, per code object: each decoder gets its own, so models never use up one another's recompiles."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__)


def unfreezable(cache: Cache) -> None:
    """Clear the static-address marks transformers puts on a static cache's tensors when it fills them first (for
    CUDA graphs): freezing takes marked inputs for parameters and folds them into the graph as constants, so every
    step would read the cache as it was when compiled. Call it after the first (eager) update, before compiled steps.
    """
    for layer in getattr(cache, "layers", ()):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and hasattr(value, "_dynamo_static_input_type"):
                del value._dynamo_static_input_type


def compile_graph(function, backend: str | object = "inductor"):
    """`function` (model, input ids, static cache) -> ... compiled as the decode paths compile: a whole graph with no
    dynamic shapes, the model's module guards skipped, a code object of its own; its first calls belong inside
    `inductor_settings()`."""
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    return torch.compile(_own_copy(function), backend=backend, fullgraph=True, dynamic=False, options=options)


def error_reason(err: BaseException) -> str:
    """`Type: first line` of the exception at the bottom of the chain: dynamo wraps a backend's error in its own,
    whose first line only says that the backend raised (the original is its `inner_exception` or `__cause__`)."""
    while (inner := getattr(err, "inner_exception", None) or err.__cause__) is not None:
        err = inner
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


class Decoder:
    """Prefill and decode steps of one model on the compiled path, or the plain one (module docstring). A compiled
    decoder assumes its model is not edited afterwards: dynamo's guards on the model's modules are skipped (they cost
    ~3 ms per step for SmolLM2-135M), so a kernel switched later would not be seen by the compiled graph."""

    def __init__(self, model, compile: bool = True, backend: str | object = "inductor"):
        # a weak reference: the process's decoders are kept per model (decoder_for) and must not keep models alive
        self._model = weakref.ref(model)
        self.path = COMPILED if compile else PLAIN
        self.note = ""  # why the plain path runs although compiling was asked for (or compiles untuned)
        self.tuned = True  # compiled with INDUCTOR_OPTIONS (False once they failed for this model)
        self.compile_seconds = 0.0  # spent compiling in this process, all buckets together
        self._compiled_lengths: set[int] = set()
        self._static_caches: weakref.WeakSet = weakref.WeakSet()  # made by new_cache: the ones the graphs fit
        self._graph = self._head = None
        if compile:
            if model.config._attn_implementation == "sdpa":
                model.set_attn_implementation(GROUPED_SDPA)
            self._head = onednn_head(model)
            self._backend = backend
            self._graph = self._new_graph()

    @property
    def model(self):
        return self._model()

    @property
    def compiled(self) -> bool:
        return self.path == COMPILED

    @property
    def head_kernel(self) -> str | None:
        """What runs the LM head on the compiled path: oneDNN, or a packed head's kernel; None: the model's own
        dense module."""
        if not self.compiled:
            return None
        if self._head is not None:
            return ONEDNN_HEAD
        head = self.model.get_output_embeddings()
        return head.kernel_label() if isinstance(head, StoredModule) else None

    def new_cache(self, tokens: int) -> Cache:
        """An empty cache for `tokens` tokens (prompt and new ones): static on the compiled path, compiled for its
        length first if need be; dynamic on the plain path."""
        if self.compiled:
            length = cache_length(tokens)
            self.warm_up(length)
            if self.compiled:  # the warm-up may have fallen back
                cache = self._static_cache(length)
                self._static_caches.add(cache)
                return cache
        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def _static_cache(self, length: int) -> StaticCache:
        # Always made in inference mode: its step counter is a tensor created here, and dynamo's guards tell an
        # inference tensor from a normal one (a cache made the other way would recompile in the middle of decoding).
        return StaticCache(config=self.model.config, max_cache_len=length)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Logits after the prompt (eager: one graph per prompt length would cost more than it saves)."""
        logits = last_logits(self.model, input_ids, cache)
        if self.step_path(cache) == COMPILED:
            unfreezable(cache)
        return logits

    @torch.inference_mode()
    def step(self, token: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Logits after one more token [batch, 1]: compiled for a cache this decoder made (new_cache) while it
        compiles; eager for any other cache."""
        if self.step_path(cache) == COMPILED:
            return self._compiled_step(token, cache)
        return last_logits(self.model, token, cache)

    def step_path(self, cache: Cache) -> str:
        """The path `step` takes with this cache."""
        return COMPILED if self.compiled and cache in self._static_caches else PLAIN

    def warm_up(self, length: int) -> None:
        """Compile the step for a static cache of `length` on a throwaway cache (timed into compile_seconds); on
        any failure switch to the plain path and keep the reason in `note`."""
        if not self.compiled or length in self._compiled_lengths:
            return
        limit = torch._dynamo.config.recompile_limit
        if len(self._compiled_lengths) >= limit:  # dynamo would silently run the step eagerly from here on
            self._fall_back(f"more than {limit} static cache lengths in one process")
            return
        start = time.perf_counter()
        with progress_bar(f"compiling the decode step (torch.compile, cache {length}, once per process)", 1) as done:
            try:
                self._compile_tuned_or_not(length)
            except Exception as err:  # noqa: BLE001  (inductor fails in many ways: no compiler, unsupported op)
                self._fall_back(f"torch.compile failed ({error_reason(err)})")
            done()
        self.compile_seconds += time.perf_counter() - start

    def _compiled_step(self, token: torch.Tensor, cache: Cache) -> torch.Tensor:
        # cloned in inference mode: a token computed outside it would differ from the warm-up's in dispatch keys,
        # which dynamo guards on (a recompile in the middle of decoding)
        out = self._graph(self.model, token.clone(), cache)
        return out if self._head is None else self._head(out).float()

    def _compile_tuned_or_not(self, length: int) -> None:
        """With INDUCTOR_OPTIONS first; where those fail (inductor's C++ GEMM template asserts on some graphs, e.g.
        EoRA's rank-4 products), once more without them, saying so in `note`; later lengths compile the same way."""
        if self.tuned:
            try:
                self._compile_for(length)
                return
            except Exception as err:  # noqa: BLE001
                self.tuned = False
                self.note = f"compiled without freezing/autotune: with them inductor failed ({error_reason(err)})"
                # a fresh code object: dynamo would otherwise keep serving a graph that compiled but computes wrong
                self._graph = self._new_graph()
        self._compile_for(length)

    def _new_graph(self):
        """The step compiled anew (a code object of its own): the logits, or the hidden state when the head runs
        after the graph."""
        return compile_graph(last_logits if self._head is None else last_hidden, self._backend)

    @torch.inference_mode()
    def _compile_for(self, length: int) -> None:
        cache = self._static_cache(length)
        token = torch.zeros(1, 1, dtype=torch.long, device=self.model.device)
        last_logits(self.model, token, cache)
        unfreezable(cache)
        with inductor_settings(self.tuned):
            for _ in range(_WARM_UP_STEPS):
                self._compiled_step(token, cache)
        # checked on caches of their own, filled with another token: a graph that folded the warm-up cache in would
        # pass a check on that same cache
        checked, reference_cache = self._static_cache(length), self._static_cache(length)
        prompt = torch.ones(1, 2, dtype=torch.long, device=self.model.device)
        last_logits(self.model, prompt, checked)
        unfreezable(checked)
        last_logits(self.model, prompt, reference_cache)
        logits = self._compiled_step(token, checked).float()
        reference = last_logits(self.model, token, reference_cache)
        _check_same_logits(logits, reference, self.model.dtype)
        self._compiled_lengths.add(length)

    def _fall_back(self, reason: str) -> None:
        self.path, self.note = PLAIN, f"{reason}; decoding on the plain path"
        self._graph = self._head = None  # the head's oneDNN copy of the weight is freed


def _check_same_logits(compiled: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype) -> None:
    """A compiled step against the eager one on the same cache state: equal up to rounding (the packed kernels
    compute in bfloat16, and inductor's templates sum in their own order), else the graph is not used: freezing and
    autotuned templates are young parts of inductor, and a wrong graph would otherwise decode wrong text silently."""
    # of the largest logit: float32 models (bfloat16 only inside the packed kernels) differ by ~0.3 % here, bfloat16
    # models by ~6 %; inductor's 8-bit weight-only template for one-row inputs was off by 27 % (W8 SmolLM2)
    tolerance = 0.02 if dtype == torch.float32 else 0.1
    scale = eager.abs().max().item()
    error = (compiled - eager).abs().max().item()
    if not error <= tolerance * scale + 1e-3:
        raise RuntimeError(
            f"the compiled step's logits differ from the eager step's by {error:.3g} (scale {scale:.3g})"
        )


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model, compile: bool = True) -> Decoder:
    """The process's decoder of `model` (compiled graphs are kept with it, so compiling is paid once); a plain one
    when `compile` is False."""
    if not compile:
        return Decoder(model, compile=False)
    if model not in _DECODERS:
        _DECODERS[model] = Decoder(model)
    return _DECODERS[model]

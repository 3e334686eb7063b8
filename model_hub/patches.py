"""Every place model_hub reaches into the import machinery or a library's internals, one small named piece each,
with what it changes, why, the versions it was written for and what breaks if the internal moves; checked by
tests/test_patches.py. Standard library only: `import model_hub` stays free of torch and transformers.

Our classes themselves are registered through transformers' public API (`AutoConfig.register`, `AutoModel.register`,
`AutoTokenizer.register`: model_hub.chatglm6b.auto, model_hub.llama.tokenizer), and the one loader
(model_hub.loader) calls `model_hub.register_with_transformers()` itself before every load. What stays here is
*when* plain transformers gets them without our loader.
"""
import importlib.abc
import sys

WRITTEN_FOR = {"python": "3.11", "transformers": "5.23.0"}


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """A finder that finds nothing itself: for `library` (transformers) and the modules of `package` it asks the
    other finders for the spec and wraps that spec's loader.exec_module, to call `callback` once `import library`
    has finished; when a `package` module's own import is what loads the library, once that module (the outermost
    one) is complete, so the callback never meets a half-initialised module of ours. It removes itself after."""

    def __init__(self, callback, package: str, library: str = "transformers"):
        self.callback, self.package, self.library = callback, package, library
        self.depth, self.pending = 0, False

    def find_spec(self, fullname, path, target=None):
        if fullname != self.library and not fullname.startswith(self.package + "."):
            return None
        spec = next((found for finder in sys.meta_path if finder is not self and hasattr(finder, "find_spec")
                     for found in [finder.find_spec(fullname, path, target)] if found is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module
        ours = fullname != self.library

        def exec_module(module):
            self.depth += ours
            try:
                load(module)
            finally:
                self.depth -= ours
            self.pending |= not ours
            if self.pending and self.depth == 0 and self in sys.meta_path:
                sys.meta_path.remove(self)
                self.callback()

        spec.loader.exec_module = exec_module  # this spec's own loader object: nothing shared is changed
        return spec


def call_when_transformers_loads(callback, package: str) -> None:
    """`callback()` now if transformers is imported already, else as soon as its import finishes, whoever imports it.

    Why: `import model_hub` promises that plain `AutoConfig/AutoModel/AutoTokenizer.from_pretrained(DIR)` then work
    on our folders (ChatGLM-6B exports, the LLaMA tokenizer) without trust_remote_code, and the registration API
    needs transformers (hence torch: seconds), while light modules such as model_hub.chatglm6b.text must stay free
    of torch (tokenize_dataset_rows's whole-process speed). Python 3.11 has no post-import hook; a meta path finder
    (importlib.abc.MetaPathFinder, public) is the standard way. Written for Python 3.11 and transformers 5.23, which
    is a regular package loaded by a loader with exec_module (SourceFileLoader): were it loaded some other way
    (a zip, a loader without exec_module), the callback would not run and plain transformers would not know our
    classes (our loader still would: it registers itself). test_patches and tests/test_layers.py check both."""
    if "transformers" in sys.modules:
        callback()
    elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport(callback, package))

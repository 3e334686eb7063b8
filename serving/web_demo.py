"""A web chat page for what the recipes trained (and the base models they start from), on the serving engine.

    python -m serving.web_demo --model tiny:glm-4-9b-chat               # a tiny model, nothing downloaded
    python -m serving.web_demo --adapter output/glm4-lora                # base from adapter_config.json
    WEB_DEMO_AUTH=me:secret python -m serving.web_demo --model runs/export --port 7860   # login required
    python -m serving.web_demo                                          # what the last `make <recipe>` trained

Replies stream in; the history goes back to the model each turn (single-turn recipe prompts use the last
message, as they were trained). Buttons: send, stop, regenerate, clear; sliders: max new tokens, top_p,
temperature (max new tokens starts at 256 on CPU, 512 on a GPU, and goes up to what the engine can hold). GLM-4:
a system prompt and a tools JSON; a tool call shows as its own message, and the result you paste goes back to the
model as the observation turn. Bound to 127.0.0.1 unless --host says otherwise (then only loopback host names are
answered unless --allowed_hosts names others, and other web pages cannot call it unless --cors_origins names
them); never shared through Gradio's tunnel. Failed logins are limited per address. SIGTERM (or Ctrl-C): replies
in flight finish (up to --drain_timeout seconds), exit 0.
"""
import argparse
import os
import sys
import threading

import gradio as gr

from tuning.errors import UserError, run_main

from .origin_guard import add_origin_flags
from .model_args import add_model_arguments, chosen_model
from .web_chat import Settings, display, error_message, last_tool_call_id, retry_point, stream_reply
from .web_server import BackgroundServer, serve, web_app

AUTH_ENV = "WEB_DEMO_AUTH"
CSS = "#chat .message-wrap { font-size: 15px }"


class WebDemo:
    """The page's event handlers around one engine (shared by every browser tab: the engine batches them)."""

    def __init__(self, engine, defaults: Settings | None = None):
        self.engine, self.defaults = engine, defaults or Settings()
        self.is_glm4 = engine.loaded.prompt_format == "glm4_chat"
        self._running: dict[str, object] = {}          # browser session → its engine request (for stop)
        self._lock = threading.Lock()

    def _reply(self, history, settings: Settings, session: str):
        def remember(request):
            with self._lock:
                self._running[session] = request
        try:
            yield from stream_reply(self.engine, history, settings, remember)
        finally:
            with self._lock:
                self._running.pop(session, None)

    def send(self, text, history, max_tokens, temperature, top_p, system, tools, request: gr.Request):
        if not text.strip():
            yield "", history, display(history)
            return
        history = history + [{"role": "user", "content": text}]
        settings = Settings(max_tokens, temperature, top_p, system, tools)
        for history_now, shown in self._reply(history, settings, request.session_hash):
            yield "", history_now, shown

    def send_tool_result(self, text, history, max_tokens, temperature, top_p, system, tools,
                         request: gr.Request):
        try:
            call_id = last_tool_call_id(history)
        except UserError as exc:
            yield text, history, display(history) + [error_message(str(exc))]
            return
        history = history + [{"role": "tool", "content": text, "tool_call_id": call_id}]
        settings = Settings(max_tokens, temperature, top_p, system, tools)
        for history_now, shown in self._reply(history, settings, request.session_hash):
            yield "", history_now, shown

    def regenerate(self, history, max_tokens, temperature, top_p, system, tools, request: gr.Request):
        history = retry_point(history)
        if not history:
            yield history, display(history)
            return
        yield from self._reply(history, Settings(max_tokens, temperature, top_p, system, tools),
                               request.session_hash)

    def stop(self, request: gr.Request):
        with self._lock:
            running = self._running.get(request.session_hash)
        if running is not None:
            running.cancel()  # the reply ends at the next decoding step and keeps what it wrote

    def build(self):
        loaded, defaults = self.engine.loaded, self.defaults
        with gr.Blocks(title=f"{loaded.name} · chat") as page:
            gr.Markdown(f"### {loaded.name}\n{loaded.family} · prompt format `{loaded.prompt_format}` · "
                        f"{str(loaded.core.dtype).replace('torch.', '')} on {loaded.device}"
                        + ("" if self.is_glm4 or loaded.prompt_format == "chatglm6b_chat" else
                           "\n\n这个模型的提示是单轮的：只用最后一条消息。/ This model's prompt is single-turn: "
                           "only the last message is used."))
            history = gr.State([])
            chatbot = gr.Chatbot(elem_id="chat", height=600, latex_delimiters=[], feedback_options=None,
                                 label="对话 / Chat", buttons=["copy", "copy_all"])
            with gr.Row():
                message = gr.Textbox(elem_id="message", show_label=False, scale=6, lines=1, max_lines=8,
                                     placeholder="输入消息，回车发送 / Type a message, Enter sends")
                send = gr.Button("发送 / Send", variant="primary", elem_id="send", scale=1)
            with gr.Row():
                stop = gr.Button("停止 / Stop", elem_id="stop")
                regenerate = gr.Button("重新生成 / Regenerate", elem_id="regenerate")
                clear = gr.Button("清空 / Clear", elem_id="clear")
            with gr.Row():
                top = reply_token_limit(loaded, self.engine.max_batch)
                start = min(defaults.max_tokens or default_max_tokens(loaded.device), top)
                max_tokens = gr.Slider(1, top, value=start, step=1, label="最大生成长度 / Max new tokens",
                                       elem_id="max_tokens")
                top_p = gr.Slider(0.01, 1, value=defaults.top_p, step=0.01, label="Top P", elem_id="top_p")
                temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.01,
                                        label="温度 / Temperature (0 = greedy)", elem_id="temperature")
            with gr.Row(visible=self.is_glm4):
                system = gr.Textbox(label="系统提示 / System prompt", lines=3, elem_id="system",
                                    value=defaults.system)
                tools = gr.Textbox(label="工具 JSON / Tools JSON", lines=3, elem_id="tools", value=defaults.tools_json,
                                   placeholder='[{"type": "function", "function": {"name": …, "parameters": {…}}}]')
            with gr.Row(visible=self.is_glm4):
                tool_result = gr.Textbox(label="工具结果 / Tool result (the called tool's output)", scale=6,
                                         elem_id="tool_result")
                send_tool_result = gr.Button("提交结果 / Send result", elem_id="send_tool_result", scale=1)

            settings = [max_tokens, temperature, top_p, system, tools]
            # Not in the API description Gradio embeds in every page, the login page too: it lists each input's
            # start value (the --system prompt) to visitors who have not logged in (issue 29, item 11).
            hidden = {"api_visibility": "undocumented"}
            message.submit(self.send, [message, history, *settings], [message, history, chatbot], **hidden)
            send.click(self.send, [message, history, *settings], [message, history, chatbot], **hidden)
            send_tool_result.click(self.send_tool_result, [tool_result, history, *settings],
                                   [tool_result, history, chatbot], **hidden)
            regenerate.click(self.regenerate, [history, *settings], [history, chatbot], **hidden)
            stop.click(self.stop, None, None, queue=False, **hidden)
            clear.click(lambda: ([], []), None, [history, chatbot], queue=False, **hidden)
            chatbot.clear(list, None, history, queue=False, **hidden)  # the chat's own trash icon
        # Every tab at once: the engine decodes their replies in one batch.
        page.queue(default_concurrency_limit=self.engine.max_batch)
        return page


def theme():
    # Local fonts only (the default theme asks Google Fonts, which a closed network never answers); wqy-zenhei /
    # Noto CJK for Chinese where the system has them.
    sans = ["system-ui", "WenQuanYi Zen Hei", "Noto Sans CJK SC", "PingFang SC", "Microsoft YaHei", "sans-serif"]
    return gr.themes.Default(font=sans, font_mono=["ui-monospace", "DejaVu Sans Mono", "monospace"])


def launch(demo: WebDemo, *, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
           allowed_hosts=(), cors_origins=(), drain_timeout: float = 30.0, block: bool = True,
           login_limit: dict | None = None):
    """Serve the page (serving/web_server.py). block: until SIGTERM / Ctrl-C, then drain the engine (returns);
    else in a thread: returns the server (`.close()`)."""
    app, streams = web_app(demo.build(), demo.engine, host=host, auth=auth, allowed_hosts=allowed_hosts,
                           cors_origins=cors_origins, theme=theme(), css=CSS, login_limit=login_limit)
    if not block:
        return BackgroundServer(app, streams, host=host, port=port)
    serve(app, streams, demo.engine, host=host, port=port, drain_timeout=drain_timeout)
    return None


def default_max_tokens(device) -> int:
    """The slider's start: a CPU writes a few tokens a second at 9B (512 took ~80 s), a GPU dozens."""
    # torch loads with the engine, after argument parsing: --help and refusals answer without it
    import torch

    return 256 if torch.device(device).type == "cpu" else 512


def kv_bytes_per_token(config, dtype) -> int:
    """The key/value cache one token takes (GLM-4 and LLaMA configs; ChatGLM-6B's num_layers, no grouped heads)."""
    import torch

    layers = getattr(config, "num_hidden_layers", None) or config.num_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "multi_query_group_num", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "kv_channels", None) or config.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def free_memory(device) -> int | None:
    """Bytes free where the caches live: the GPU's, else the machine's available memory (None: unknown)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
        return kib * 1024
    except (OSError, StopIteration, ValueError):
        return None


def reply_token_limit(loaded, max_batch: int, free_bytes: int | None = None) -> int:
    """The max-new-tokens slider's top: the model's context, or less when the caches of `max_batch` replies that
    long would not fit in half of the free memory (the other half: activations, fragmentation)."""
    free_bytes = free_memory(loaded.device) if free_bytes is None else free_bytes
    if free_bytes is None:
        return loaded.context_length
    per_token = kv_bytes_per_token(loaded.core.config, loaded.core.dtype)
    return max(1, min(loaded.context_length, free_bytes // 2 // max_batch // per_token))


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, colon, password = value.partition(":")
    if not colon or not user or not password:
        raise UserError("expected user:password", field="auth")
    return user, password


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the page: set a login)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", default=None, help=f"require this user:password to open the page; prefer the "
                        f"environment variable {AUTH_ENV} (a flag is visible to every user of this machine in the "
                        "process list)")
    parser.add_argument("--max_batch", type=int, default=8, help="replies decoded together")
    parser.add_argument("--max_tokens", type=int, default=None, help="the max new tokens slider's start value "
                        "(default: 256 on CPU, 512 on a GPU)")
    parser.add_argument("--temperature", type=float, default=0.6, help="the temperature slider's start value")
    parser.add_argument("--top_p", type=float, default=0.8, help="the top_p slider's start value")
    parser.add_argument("--system", default="", help="the system prompt box's start value (GLM-4)")
    parser.add_argument("--drain_timeout", type=float, default=30.0,
                        help="seconds SIGTERM / Ctrl-C lets the replies in flight finish")
    add_origin_flags(parser, "browsers")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    auth = parse_auth(args.auth or os.environ.get(AUTH_ENV))
    if args.auth:
        print(f"note: a password given as --auth is visible to every user of this machine in the process list; set "
              f"{AUTH_ENV} instead", file=sys.stderr)
    if not 0 < args.port < 65536:
        raise UserError("expected a port from 1 to 65535", field="port")
    if args.max_batch < 1 or (args.max_tokens is not None and args.max_tokens < 1):
        raise UserError("must be at least 1", field="max_batch / max_tokens")
    if not (0 <= args.temperature <= 2 and 0 < args.top_p <= 1):
        raise UserError("temperature must be in [0, 2] and top_p in (0, 1]", field="temperature / top_p")
    if args.drain_timeout < 0:
        raise UserError("must not be negative", field="drain_timeout")
    model, adapter = chosen_model(args)  # --last_trained is what happens without --model and --adapter
    from .engine import Engine
    from .loading import load_for_serving

    loaded = load_for_serving(model, adapter, dtype=args.dtype, device=args.device, prompt_format=args.prompt_format)
    engine = Engine(loaded, max_batch=args.max_batch)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not auth:
        print(f"warning: the page is open to anyone who can reach {args.host}; set {AUTH_ENV}", file=sys.stderr)
    print(f"web demo for {loaded.name!r} ({loaded.family}, prompt format {loaded.prompt_format}) at "
          f"http://{args.host}:{args.port}/{' (login required)' if auth else ''}", flush=True)
    defaults = Settings(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        system=args.system)
    try:
        launch(WebDemo(engine, defaults), host=args.host, port=args.port, auth=auth,
               drain_timeout=args.drain_timeout, allowed_hosts=args.allowed_hosts, cors_origins=args.cors_origins)
    finally:
        engine.close(timeout=5)
    print(f"web demo stopped ({engine.stats()['steps']} decoding steps)", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    run_main(main)

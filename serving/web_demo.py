"""A web chat page for what the recipes trained (and the base models they start from), on the serving engine.

    python -m serving.web_demo --model tiny:glm-4-9b-chat               # a tiny model, nothing downloaded
    python -m serving.web_demo --adapter output/glm4-lora                # base from adapter_config.json
    python -m serving.web_demo --model runs/export --port 7860 --auth me:secret
    python -m serving.web_demo                                          # what the last `make <recipe>` trained

Replies stream in; the history goes back to the model each turn (single-turn recipe prompts use the last
message, as they were trained). Buttons: send, stop, regenerate, clear; sliders: max new tokens, top_p,
temperature. GLM-4: a system prompt and a tools JSON; a tool call shows as its own message, and the result you
paste goes back to the model as the observation turn. Bound to 127.0.0.1 unless --host says otherwise; never
shared through Gradio's tunnel.
"""
import argparse
import os
import sys
import threading

import gradio as gr

from tuning.errors import UserError, run_main

from .model_args import add_model_arguments, chosen_model
from .web_chat import Settings, display, error_message, last_tool_call_id, retry_point, stream_reply

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
                max_tokens = gr.Slider(1, loaded.context_length, value=min(defaults.max_tokens,
                                       loaded.context_length), step=1, label="最大生成长度 / Max new tokens",
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
            message.submit(self.send, [message, history, *settings], [message, history, chatbot])
            send.click(self.send, [message, history, *settings], [message, history, chatbot])
            send_tool_result.click(self.send_tool_result, [tool_result, history, *settings],
                                   [tool_result, history, chatbot])
            regenerate.click(self.regenerate, [history, *settings], [history, chatbot])
            stop.click(self.stop, None, None, queue=False)
            clear.click(lambda: ([], []), None, [history, chatbot], queue=False)
            chatbot.clear(list, None, history, queue=False)  # the chat's own trash icon
        # Every tab at once: the engine decodes their replies in one batch.
        page.queue(default_concurrency_limit=self.engine.max_batch)
        return page


def theme():
    # Local fonts only (the default theme asks Google Fonts, which a closed network never answers); wqy-zenhei /
    # Noto CJK for Chinese where the system has them.
    sans = ["system-ui", "WenQuanYi Zen Hei", "Noto Sans CJK SC", "PingFang SC", "Microsoft YaHei", "sans-serif"]
    return gr.themes.Default(font=sans, font_mono=["ui-monospace", "DejaVu Sans Mono", "monospace"])


def launch(page, *, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
           block: bool = True):
    page.launch(server_name=host, server_port=port, share=False, auth=auth, theme=theme(), css=CSS,
                prevent_thread_lock=not block, quiet=True, show_error=True)
    return page


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
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the page: set --auth)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", default=None, help=f"require this user:password to open the page "
                                                     f"(default: ${AUTH_ENV})")
    parser.add_argument("--max_batch", type=int, default=8, help="replies decoded together")
    parser.add_argument("--max_tokens", type=int, default=512, help="the max new tokens slider's start value")
    parser.add_argument("--temperature", type=float, default=0.6, help="the temperature slider's start value")
    parser.add_argument("--top_p", type=float, default=0.8, help="the top_p slider's start value")
    parser.add_argument("--system", default="", help="the system prompt box's start value (GLM-4)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    auth = parse_auth(args.auth or os.environ.get(AUTH_ENV))
    if not 0 < args.port < 65536:
        raise UserError("expected a port from 1 to 65535", field="port")
    if args.max_batch < 1 or args.max_tokens < 1:
        raise UserError("must be at least 1", field="max_batch / max_tokens")
    if not (0 <= args.temperature <= 2 and 0 < args.top_p <= 1):
        raise UserError("temperature must be in [0, 2] and top_p in (0, 1]", field="temperature / top_p")
    model, adapter = chosen_model(args)  # --last_trained is what happens without --model and --adapter
    from .engine import Engine
    from .loading import load_for_serving

    loaded = load_for_serving(model, adapter, dtype=args.dtype, device=args.device, prompt_format=args.prompt_format)
    engine = Engine(loaded, max_batch=args.max_batch)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not auth:
        print(f"warning: the page is open to anyone who can reach {args.host}; set --auth", file=sys.stderr)
    print(f"web demo for {loaded.name!r} ({loaded.family}, prompt format {loaded.prompt_format}) at "
          f"http://{args.host}:{args.port}/{' (login required)' if auth else ''}", flush=True)
    defaults = Settings(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        system=args.system)
    try:
        launch(WebDemo(engine, defaults).build(), host=args.host, port=args.port, auth=auth)
    finally:
        engine.close(timeout=5)


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    run_main(main)

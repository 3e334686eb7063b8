"""ChatGLM-Tuning's prompt as text (torch-free): what chatglm_lora trains on and what serving sends its adapters.

ChatGLM-6B's own chat format ("[Round N]\\n问：…\\n答：", `build_prompt`, and its answer clean-up
`process_response`) lives in `model_hub.chatglm6b.text`.
"""


def format_example(example: dict) -> dict:
    """The original's prompt: "Instruction: …\\n[Input: …\\n]Answer: " → context; the output → target."""
    context = f"Instruction: {example['instruction']}\n"
    if example.get("input"):
        context += f"Input: {example['input']}\n"
    context += "Answer: "
    return {"context": context, "target": example["output"]}


def tuning_prompt(instruction: str, input: str | None = None) -> str:
    """The context an answer is generated from (the tutorial's infer.py)."""
    return format_example({"instruction": instruction, "input": input, "output": ""})["context"]


def clean_tuning_answer(text: str) -> str:
    """The tutorial's post-processing: drop the old training format's trailing "\\nEND", strip."""
    return text.replace("\nEND", "").strip()

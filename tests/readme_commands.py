"""Reading the bash commands out of the READMEs, shared by test_readme_paths.py (the paths they name) and
test_readme_commands.py (running them)."""
import re

READMES = ["README.md", "chatglm_lora/README.md", "llama_ner/README.md", "glm4_finetune/README.md"]
HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")


def commands(text: str) -> list[str]:
    """The commands of the README's bash blocks in order: continuation lines joined, comments dropped, a here-document
    kept with its command (one string, lines joined by newlines)."""
    found = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        lines = block.replace("\\\n", " ").splitlines()
        while lines:
            line = lines.pop(0)
            heredoc = HEREDOC.search(line)
            if heredoc:  # a here-document's lines are data, not commands (a '#' in them is no comment)
                body = []
                while lines and lines[0].strip() != heredoc.group(1):
                    body.append(lines.pop(0))
                end = lines.pop(0) if lines else ""
                found.append("\n".join([line.strip(), *body, end.strip()]))
                continue
            line = re.split(r"\s#", line, maxsplit=1)[0].strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def readme_commands(path: str) -> list[str]:
    """commands() of a README file, each once (the Chinese and English sections repeat most of them)."""
    with open(path, encoding="utf-8") as f:
        return list(dict.fromkeys(commands(f.read())))

"""The chat's slash commands and what each does: the one table behind ``/help``, Tab
completion and ``llava chat --help``. No imports, so ``--help`` stays fast."""

COMMANDS = {
    "/image": "PATH... attach images to the next message",
    "/images": "the images and their token cost; '/images clear' detaches those not sent yet",
    "/clear": "start a new conversation (same model)",
    "/system": "TEXT set the system prompt; '/system' shows it, '/system -' resets it",
    "/retry": "answer the last message again",
    "/undo": "drop the last message and its answer",
    "/save": "FILE save the chat (.json for programs, else Markdown)",
    "/load": "FILE resume a saved chat",
    "/set": "KEY VALUE temperature, top-p, top-k, min-p, repeat-penalty, max-tokens, seed",
    "/stats": "context use, and the last turn's work and speed",
    "/prompt": "[TEXT] the prompt as the model reads it: so far, or with TEXT as the next message",
    "/help": "this list",
    "/exit": "end the chat (also /bye, Ctrl-D)",
}

"""Shared inputs of the tokenizer and processor tests."""

N = 4  # tokens_per_image in these tests
CHAT = [
    {"role": "user", "content": "What is in this picture?"},
    {"role": "assistant", "content": "A grey cat sleeping on a red sofa."},
    {"role": "user", "content": "And the colour of the sofa?"},
    {"role": "assistant", "content": "It is red."},
]
SENTENCES = [
    "Hello world",
    "A rocket launches into the blue sky at 5:30 p.m.",
    "  two leading spaces,\ttabs and\n\nnewlines  ",
    "Ünïcödé café naïve, 日本語, 中文, emoji 🚀🐈 and digits 1234567890.",
    "don't can't it's we'll they've I'm you'd",
]

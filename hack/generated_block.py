"""Generated blocks of the docs: figures a command measures, written by that command.

A page holds a block between two markers:

    <!-- begin generated: NAME -->
    ...
    <!-- end generated: NAME -->

`replace_block(path, name, body)` replaces what is between them with `body` and
leaves the rest of the page as it is. A page without the block gets it appended
(with a note on stderr). Used by hack/bench, hack/bench-pool and
hack/bench-operator.py; also a command:

    python3 hack/generated_block.py PAGE NAME < BODY
"""

import os
import sys


def markers(name):
    return f"<!-- begin generated: {name} -->", f"<!-- end generated: {name} -->"


def replace_in(text, name, body):
    """`text` with block `name` holding `body` (appended when there is none)."""
    begin, end = markers(name)
    block = f"{begin}\n{body.strip(chr(10))}\n{end}"
    i = text.find(begin)
    if i < 0:
        return text.rstrip("\n") + "\n\n" + block + "\n", False
    j = text.find(end, i)
    if j < 0:
        raise ValueError(f"'{begin}' has no '{end}' after it")
    if text.find(begin, i + len(begin)) >= 0:
        raise ValueError(f"'{begin}' appears twice")
    return text[:i] + block + text[j + len(end):], True


def replace_block(path, name, body):
    text = open(path).read() if os.path.exists(path) else ""
    new, found = replace_in(text, name, body)
    if not found:
        print(f"{path}: no generated block '{name}'; appended it", file=sys.stderr)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python3 hack/generated_block.py PAGE NAME < BODY")
    replace_block(sys.argv[1], sys.argv[2], sys.stdin.read())

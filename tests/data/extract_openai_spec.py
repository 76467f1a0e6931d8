"""Cut tests/data/openai-openapi-subset.json out of OpenAI's published OpenAPI spec.

The spec (github.com/openai/openai-openapi, ``openapi.json``, about 3.4 MB) is pinned by commit; only
the schemas kvproxy's answers are validated against, and everything they reference, are kept,
unchanged. To update: check the repository out at a newer commit and run

    python tests/data/extract_openai_spec.py /path/to/openai-openapi/openapi.json COMMIT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "Response",
    "ResponseStreamEvent",
    "Model",
    "ListModelsResponse",
    "CreateEmbeddingResponse",
    "ErrorResponse",
]
OUT = Path(__file__).with_name("openai-openapi-subset.json")


def closure(schemas: dict[str, Any], roots: list[str]) -> dict[str, Any]:
    seen: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str) and value.startswith("#/components/schemas/"):
                    name = value.rsplit("/", 1)[1]
                    if name not in seen:
                        seen.add(name)
                        walk(schemas[name])
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for root in roots:
        seen.add(root)
        walk(schemas[root])
    return {name: schemas[name] for name in sorted(seen)}


def main(spec_path: str, commit: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    subset = {
        "x-source": {
            "repository": "https://github.com/openai/openai-openapi",
            "file": "openapi.json",
            "commit": commit,
            "openapi": spec["openapi"],
            "info.version": spec["info"]["version"],
            "roots": ROOTS,
        },
        "components": {"schemas": closure(spec["components"]["schemas"], ROOTS)},
    }
    OUT.write_text(json.dumps(subset, indent=1, sort_keys=False) + "\n")
    print(f"{OUT}: {len(subset['components']['schemas'])} schemas")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

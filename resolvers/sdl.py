"""Write the SDL of the served schema to ``schema/schema.graphql``.

Run ``python -m resolvers.sdl`` (``make sdl``) after changing the API; a test fails while the
committed file differs from the code.
"""

from __future__ import annotations

from pathlib import Path

from resolvers.root import build_schema

SDL_PATH = Path(__file__).resolve().parents[1] / "schema" / "schema.graphql"


def current_sdl() -> str:
    return build_schema().as_str() + "\n"


def main() -> None:
    SDL_PATH.write_text(current_sdl())
    print(f"wrote {SDL_PATH}")


if __name__ == "__main__":
    main()

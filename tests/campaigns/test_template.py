"""Message templates: `@valorN` substitution, missing values, and `@valor1` not eating `@valor10`."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from services.campaigns.template import MAX_MESSAGE_CHARS, MISSING, compile_template


def words(pieces: list[str], *, max_size: int) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(pieces), max_size=max_size).map("".join)


# Values and literals made of these can never spell or complete an `@valorN`.
SAFE = st.characters(blacklist_categories=("Cs",), blacklist_characters="@valor0123456789")
# Literal text between variables: may hold "@", "valor" and digits, but never starts with a
# digit (that would lengthen the variable before it) nor holds a whole `@valor` + digit.
LITERAL = words(["a", " ", "@", "valor", "1", "¡", "ñ", "\n", "{}", "@valo"], max_size=6).filter(
    lambda s: not s[:1].isdigit() and not re.search(r"@valor\d", s)
)


def test_example_from_the_guide() -> None:
    template = compile_template("Hola @valor1, tu pedido @valor2 ha sido procesado. Gracias @valor1!")
    assert template.max_index == 2
    assert (
        template.render(["leonardo", "12345"]) == "Hola leonardo, tu pedido 12345 ha sido procesado. Gracias leonardo!"
    )


def test_valor10_is_not_valor1_followed_by_zero() -> None:
    values = [f"v{i}" for i in range(1, 13)]
    template = compile_template("@valor1 @valor10 @valor12 @valor100")
    assert template.max_index == 100
    assert template.render(values) == f"v1 v10 v12 {MISSING}"


def test_missing_empty_and_blank_values_render_as_dashes() -> None:
    template = compile_template("[@valor1][@valor2][@valor3][@valor4]")
    assert template.render(["", "  \t", "x"]) == "[---][---][x][---]"
    assert template.render([]) == "[---][---][---][---]"


def test_valor0_and_leading_zeros_stay_literal() -> None:
    template = compile_template("@valor0 @valor01 @valor @valores @valor1")
    assert template.max_index == 1
    assert template.render(["a"]) == "@valor0 @valor01 @valor @valores a"


def test_values_are_inserted_verbatim() -> None:
    template = compile_template("@valor1|@valor2")
    assert template.render(["@valor2", " {0} %s \\1 "]) == "@valor2| {0} %s \\1 "


def test_no_variables() -> None:
    template = compile_template("Hola")
    assert template.max_index == 0
    assert template.render(["ignored"]) == "Hola"


@given(
    parts=st.lists(st.tuples(LITERAL, st.integers(1, 15)), max_size=8),
    end=LITERAL,
    values=st.lists(st.text(max_size=5), max_size=15),
)
def test_render_matches_a_model(parts: list[tuple[str, int]], end: str, values: list[str]) -> None:
    template = compile_template("".join(f"{literal}@valor{n}" for literal, n in parts) + end)

    def expected(n: int) -> str:
        value = values[n - 1] if n <= len(values) else ""
        return value if value.strip() else MISSING

    assert template.render(values) == "".join(literal + expected(n) for literal, n in parts) + end
    assert template.max_index == max((n for _, n in parts), default=0)


@given(
    text=words(["@valor", "@", "valor", "0", "1", "2", "9", " ", "x"], max_size=30),
    values=st.lists(st.text(SAFE, max_size=4), max_size=12),
)
def test_render_leaves_no_variable(text: str, values: list[str]) -> None:
    rendered = compile_template(text).render(values)
    assert not re.search(r"@valor[1-9]", rendered)


# --- the message's length ---------------------------------------------------------------------


@given(
    st.lists(st.integers(1, 4), max_size=8),
    st.lists(st.text(alphabet="ab |\t", max_size=3000), max_size=5),
    st.integers(0, 4096),
)
def test_rendered_chars_is_the_rendered_length_and_short_lines_are_surely_within_the_limit(
    uses: list[int], values: list[str], literal: int
) -> None:
    text = "x" * literal + "".join(f" @valor{n}" for n in uses)
    template = compile_template(text)
    values = [value.strip() for value in values]
    chars = template.rendered_chars(values)
    assert chars == len(template.render(values))
    # A line (phone, values, separators) no longer than safe_line_chars renders within the limit.
    line = "+56987654321|" + "|".join(values)
    if len(line) <= template.safe_line_chars:
        assert chars <= MAX_MESSAGE_CHARS

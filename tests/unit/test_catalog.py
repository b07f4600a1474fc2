"""models.toml: the shipped catalog, validation with key paths, quant discovery from listings."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.catalog.catalog import (
    DEFAULT_CATALOG_PATH,
    discover_quant_files,
    load_catalog,
    parse_catalog,
)
from agent.catalog.quants import parse_quant_tag
from agent.errors import ConfigError

ISSUE_EXAMPLE = """
[models.gemma-3-270m-it]
repo = "unsloth/gemma-3-270m-it-GGUF"
revision = "main"
n_ctx = 2048
files = { Q8_0 = "gemma-3-270m-it-Q8_0.gguf" }
"""


def test_issue_example_parses() -> None:
    """The core keys from the issue (repo, revision, n_ctx, files) are the format."""
    entry = parse_catalog(ISSUE_EXAMPLE).get("gemma-3-270m-it")
    assert entry.repo == "unsloth/gemma-3-270m-it-GGUF"
    assert entry.revision == "main"
    assert entry.n_ctx == 2048
    assert entry.files == {"Q8_0": "gemma-3-270m-it-Q8_0.gguf"}
    assert entry.kind == "chat"


def test_optional_keys_default() -> None:
    """Only repo is required: revision defaults to main, files to discovery."""
    entry = parse_catalog('[models.m]\nrepo = "a/b"\n').get("m")
    assert (entry.revision, entry.n_ctx, entry.files, entry.license) == ("main", None, None, None)
    assert entry.quant_files() == {}


def test_shipped_catalog_is_valid_and_covers_the_issue_models() -> None:
    """The default models.toml loads and lists Gemma 3, Qwen2.5, Llama 3.2, SmolLM2 and Phi-3 entries."""
    catalog = load_catalog()
    assert DEFAULT_CATALOG_PATH.name == "models.toml"
    for name in (
        "gemma-3-270m-it",
        "gemma-3-1b-it",
        "qwen2.5-0.5b-instruct",
        "qwen2.5-1.5b-instruct",
        "llama-3.2-1b-instruct",
        "smollm2-135m-instruct",
        "smollm2-360m-instruct",
        "smollm2-1.7b-instruct",
        "phi-3-mini-4k-instruct",
    ):
        entry = catalog.get(name)
        assert entry.files, name
        assert entry.license, name


def test_shipped_file_names_carry_their_quant_tag() -> None:
    """Every listed file's name parses to the tag it is listed under (except Microsoft's bare 'q4')."""
    for name, entry in load_catalog().models.items():
        for tag, filename in (entry.files or {}).items():
            if filename == "Phi-3-mini-4k-instruct-q4.gguf":
                continue
            assert parse_quant_tag(filename) == tag, (name, filename)


def test_quant_files_come_best_first() -> None:
    """quant_files() orders by the ladder, whatever order the TOML used."""
    catalog = parse_catalog(
        '[models.m]\nrepo = "a/b"\nfiles = { Q4_K_M = "m-Q4_K_M.gguf", q8_0 = "m-Q8_0.gguf", F16 = "m-f16.gguf" }\n'
    )
    assert list(catalog.get("m").quant_files()) == ["F16", "Q8_0", "Q4_K_M"]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[models.m]\nrepo = "not-a-repo"\n', "models.m.repo: Value error, must be a Hub repo id"),
        ('[models.m]\nrepo = "a/b"\nn_ctx = 10\n', "models.m.n_ctx: Input should be greater than or equal to 64"),
        (
            '[models.m]\nrepo = "a/b"\nfiles = { Q9_9 = "x.gguf" }\n',
            "models.m.files: Value error, unknown quant tag 'Q9_9'",
        ),
        ('[models.m]\nrepo = "a/b"\nfiles = { Q8_0 = "x.bin" }\n', "is not a .gguf file"),
        ('[models.m]\nrepo = "a/b"\nflavour = "x"\n', "models.m.flavour: unknown key"),
        ("[models.m]\n", "models.m.repo: Field required"),
        ('[models."a:b"]\nrepo = "a/b"\n', "used as MODEL[:QUANT]"),
        ('models = 3\n', "models: Input should be a valid dictionary"),
    ],
)
def test_validation_errors_name_the_key_path(toml: str, message: str) -> None:
    """Each invalid entry raises ConfigError with the dotted key path of the problem."""
    with pytest.raises(ConfigError) as err:
        parse_catalog(toml, "my.toml")
    assert "invalid configuration in my.toml" in str(err.value)
    assert message in str(err.value)


def test_unquoted_dotted_model_name_gets_a_hint() -> None:
    """[models.qwen2.5-0.5b] splits at the dots in TOML; the error says to quote the name."""
    with pytest.raises(ConfigError, match="quote model names that contain a dot"):
        parse_catalog('[models.qwen2.5-0.5b]\nrepo = "a/b"\n')


def test_bad_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    """Syntax errors and a missing catalog file raise ConfigError naming the file."""
    with pytest.raises(ConfigError, match=r"invalid TOML in x\.toml"):
        parse_catalog("[models", "x.toml")
    with pytest.raises(ConfigError, match="catalog file not found"):
        load_catalog(tmp_path / "none.toml")


def test_unknown_model_lists_the_known_ones() -> None:
    """Asking for a name not in the catalog names the ones that are."""
    with pytest.raises(ConfigError, match="known models: gemma-3-270m-it"):
        parse_catalog(ISSUE_EXAMPLE).get("gemma-9")


def test_discovery_from_a_repo_listing() -> None:
    """Listing-based discovery keeps weights only, first split parts only, best quant first."""
    listing = [
        ".gitattributes",
        "README.md",
        "gemma-3-1b-it-Q4_K_M.gguf",
        "gemma-3-1b-it-Q8_0.gguf",
        "gemma-3-1b-it-UD-Q4_K_XL.gguf",
        "mmproj-F16.gguf",
        "big-F16-00001-of-00002.gguf",
        "big-F16-00002-of-00002.gguf",
        "imatrix_unsloth.dat",
        "Model-Q4_0_8_8.gguf",
        "params",
    ]
    assert discover_quant_files(listing) == {
        "F16": "big-F16-00001-of-00002.gguf",
        "Q8_0": "gemma-3-1b-it-Q8_0.gguf",
        "UD-Q4_K_XL": "gemma-3-1b-it-UD-Q4_K_XL.gguf",
        "Q4_K_M": "gemma-3-1b-it-Q4_K_M.gguf",
    }

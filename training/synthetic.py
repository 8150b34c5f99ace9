"""A synthetic instruction task and its hidden gold preference: the data of `rlhf demo`.

Nothing is downloaded: the demo, the benchmarks and the tests draw their
prompts, demonstrations and labelled comparisons from here.

Prompts ask for one sentence about a topic for an audience, e.g.
``"Describe the ocean for a child :\\n"``. A response is a short sentence of
space-separated words (punctuation is its own word), e.g.
``"first , the ocean has waves and coral because it also has fish ."``.

The hidden gold function (the "human") scores a response in [0, 1]:

- relevance: distinct words of the PROMPT's topic (up to 3), 0.45;
- helpfulness: distinct words from `HELPFUL` (up to 2), 0.25;
- a proper stop: exactly one "." and it is the last word, 0.15;
- a sensible length (6..16 words), 0.15;

times (distinct content words / content words) ** 2, times 0.5 per word that
repeats its predecessor (so repeating a token scores near 0), minus 0.15 per
distinct word of ANOTHER topic. Only pairwise labels drawn from it reach the
reward model; PPO is judged by it on greedy responses to held-out prompts.

The SFT corpus is mediocre on purpose: its most likely path at every choice
point is bland ("well , it is really nice and it is pretty cool ."; gold 0.3),
while the helpful and on-topic options are common enough (20-55 %) that
sampling from the SFT model explores them and PPO can promote them. Each noun
slot of the grammar draws from its own third of a topic's words (and its own
filler), so a sharpened policy does not fall into "stuff and stuff" under
greedy decoding; repeating a word is still possible and still punished.

Comparisons are between two independent responses of a sampler broader than
the SFT corpus (`PAIR_MIX`: more off-topic nouns, run-ons and degenerate
repetition), labelled by a Bradley-Terry annotator. Measured with the demo's
tiny GPT-2, the reward model learns style (helpful words, stop, run-ons,
repetition within a phrase, topic nouns vs filler) well and prompt relevance
(which topic) hardly: the reward-hacking gap the demo is meant to show.
"""

import math
import random
from dataclasses import dataclass, replace

# Each topic's words, in three slots: "has <0:3> and <3:6> because it also has <6:8>".
TOPICS: dict[str, tuple[str, ...]] = {
    "ocean": ("waves", "salt", "fish", "tide", "coral", "shells", "whales", "sailors"),
    "forest": ("trees", "leaves", "moss", "deer", "shade", "roots", "pines", "owls"),
    "city": ("streets", "traffic", "towers", "crowds", "lights", "buses", "shops", "bridges"),
    "music": ("melody", "rhythm", "notes", "drums", "songs", "chords", "tempo", "singers"),
    "space": ("stars", "planets", "orbit", "rockets", "moon", "galaxy", "comets", "gravity"),
    "kitchen": ("stove", "knives", "pans", "spices", "bread", "oven", "recipes", "plates"),
    "winter": ("snow", "ice", "frost", "scarves", "sleds", "fireplace", "blizzard", "mittens"),
    "garden": ("flowers", "soil", "seeds", "roses", "weeds", "bees", "tulips", "vegetables"),
    "school": ("teachers", "lessons", "desks", "homework", "pupils", "books", "exams", "chalk"),
    "desert": ("sand", "dunes", "cactus", "heat", "camels", "oasis", "lizards", "mirages"),
    "farm": ("cows", "barns", "tractors", "hay", "chickens", "fields", "crops", "fences"),
    "mountain": ("peaks", "cliffs", "rocks", "summit", "trails", "glaciers", "altitude", "goats"),
}
HELPFUL = ("first", "because", "example", "also")
FILLER_NOUNS = ("things", "stuff", "parts")  # one per slot
_SLOTS = (slice(0, 3), slice(3, 6), slice(6, 8))
ADJECTIVES = ("really nice", "very good", "pretty cool", "kind of fine", "okay")
FUNCTION_WORDS = frozenset("it is the a and has for , . of".split())
AUDIENCES = ("child", "friend", "student", "tourist", "neighbour", "visitor", "cousin", "reader")
# The topic is always the third token, right after "<Verb> the".
TEMPLATES = (
    "Describe the {topic} for a {aud} :\n",
    "Explain the {topic} to a {aud} :\n",
    "Present the {topic} to a {aud} :\n",
    "Introduce the {topic} to a {aud} :\n",
    "Summarize the {topic} for a {aud} :\n",
    "Praise the {topic} for a {aud} :\n",
)
_WORD_TOPIC = {w: t for t, words in TOPICS.items() for w in words}
_SPLIT_SEED = 1234  # fixes which prompts are held out (one in six)


@dataclass(frozen=True)
class ResponseMix:
    """Probabilities of the response grammar's choices (each in [0, 1])."""

    well: float = 0.42  # opener "well ," (the bland mode)
    first: float = 0.24  # opener "first ," (helpful)
    example: float = 0.06  # opener "for example ," (helpful); else no opener
    subject_it: float = 0.55  # subject "it" instead of "the <topic>"
    has_after_topic: float = 0.6  # "has <nouns>" after "the <topic>" (else "is <adj>")
    has_after_it: float = 0.4  # "has <nouns>" after "it" (else "is <adj>")
    noun_topic: float = 0.55  # a noun is a word of the prompt's topic
    noun_other: float = 0.08  # ... of another topic (else a filler noun)
    and_more: float = 0.45  # continue with "and it is <adj>"
    because: float = 0.22  # continue with "because it also has <noun>"
    ramble: float = 0.10  # end with a run-on "and stuff and stuff" instead of "."
    degenerate: float = 0.0  # a repetitive response (one word over and over, or stutters)


SFT_MIX = ResponseMix()
# Annotators compare responses from a broader sampler than the SFT corpus, so
# the reward model also sees repetition and off-topic words.
PAIR_MIX = ResponseMix(well=0.3, first=0.3, example=0.08, noun_other=0.15, ramble=0.15,
                       degenerate=0.08)


def _all_prompts() -> list[str]:
    """Every prompt of the task (576), in a fixed order."""
    return [t.format(topic=topic, aud=aud) for t in TEMPLATES for topic in TOPICS
            for aud in AUDIENCES]


def _pool(heldout: bool) -> list[str]:
    """The train or held-out prompt pool; the two are disjoint by construction."""
    prompts = _all_prompts()
    held = set(random.Random(_SPLIT_SEED).sample(range(len(prompts)), len(prompts) // 6))
    return [p for i, p in enumerate(prompts) if (i in held) == heldout]


def _draw(pool: list[str], n: int, seed: int) -> list[str]:
    """n prompts from pool: without replacement when n fits, else cycling reshuffles."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        out += rng.sample(pool, len(pool))
    return out[:n]


def train_prompts(n: int, seed: int) -> list[str]:
    """n training prompts (PPO / SFT / RM), each ending in a newline."""
    return _draw(_pool(heldout=False), n, seed)


def heldout_prompts(n: int, seed: int) -> list[str]:
    """n evaluation prompts, disjoint from every training prompt."""
    return _draw(_pool(heldout=True), n, seed)


def topic_of(prompt: str) -> str:
    """The topic named in a prompt ("" when it names none)."""
    words = prompt.replace("\n", " ").split()
    return next((w for w in words if w in TOPICS), "")


def _noun(rng: random.Random, topic: str, mix: ResponseMix, slot: int) -> str:
    """The noun of a grammar slot (0, 1, 2): of the topic, of another topic, or filler."""
    r = rng.random()
    if r < mix.noun_topic:
        return rng.choice(TOPICS[topic][_SLOTS[slot]])
    if r < mix.noun_topic + mix.noun_other:
        other = rng.choice([t for t in TOPICS if t != topic])
        return rng.choice(TOPICS[other][_SLOTS[slot]])
    return FILLER_NOUNS[slot]


def _clause(rng: random.Random, topic: str, mix: ResponseMix, subject_it: bool) -> list[str]:
    """ "is <adjective>" or "has <noun> and <noun>" after the subject."""
    p_has = mix.has_after_it if subject_it else mix.has_after_topic
    if rng.random() >= p_has:
        return ["is", *rng.choice(ADJECTIVES[:2]).split()]
    return ["has", _noun(rng, topic, mix, 0), "and", _noun(rng, topic, mix, 1)]


def _degenerate(rng: random.Random, topic: str, mix: ResponseMix) -> str:
    """A repetitive response: one word over and over, or a normal one that stutters."""
    if rng.random() < 0.5:
        word = rng.choice(TOPICS[topic] + FILLER_NOUNS + HELPFUL)
        return " ".join([word] * rng.randint(3, 12))
    words = sample_response(rng, topic, replace(mix, degenerate=0.0)).split()
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(words) - 1)
        words.insert(i, words[i])
    return " ".join(words)


def sample_response(rng: random.Random, topic: str, mix: ResponseMix = SFT_MIX) -> str:
    """One response of the task's grammar for a topic, drawn with mix's probabilities."""
    if rng.random() < mix.degenerate:
        return _degenerate(rng, topic, mix)
    r = rng.random()
    opener = (["well", ","] if r < mix.well else ["first", ","] if r < mix.well + mix.first
              else ["for", "example", ","] if r < mix.well + mix.first + mix.example else [])
    subject_it = rng.random() < mix.subject_it
    words = opener + (["it"] if subject_it else ["the", topic])
    words += _clause(rng, topic, mix, subject_it)
    r = rng.random()
    if r < mix.and_more:
        adjectives = [a for a in ADJECTIVES if a.split()[0] not in words]
        words += ["and", "it", "is", *rng.choice(adjectives).split()]
    elif r < mix.and_more + mix.because:
        words += ["because", "it", "also", "has", _noun(rng, topic, mix, 2)]
    tail = ["and", "stuff"] * rng.randint(2, 4) if rng.random() < mix.ramble else ["."]
    return " ".join(words + tail)


def gold_score(prompt: str, response: str) -> float:
    """Hidden gold preference of a response to a prompt, in [0, 1] (see module doc)."""
    words = response.split()
    if not words:
        return 0.0
    topic = topic_of(prompt)
    on_topic = {w for w in words if _WORD_TOPIC.get(w) == topic}
    off_topic = {w for w in words if w in _WORD_TOPIC and _WORD_TOPIC[w] != topic}
    helpful = {w for w in words if w in HELPFUL}
    content = [w for w in words if w not in FUNCTION_WORDS]
    distinct = len(set(content)) / len(content) if content else 1.0
    stutters = sum(a == b for a, b in zip(words, words[1:]))  # "it it", ", ,"
    stop = float(words[-1] == "." and words.count(".") == 1)
    n = len(words)
    length = 1.0 if 6 <= n <= 16 else max(0.0, 1.0 - min(abs(n - 6), abs(n - 16)) / 8)
    base = (0.45 * min(len(on_topic), 3) / 3 + 0.25 * min(len(helpful), 2) / 2
            + 0.15 * stop + 0.15 * length)
    return min(1.0, max(0.0, base * distinct**2 * 0.5**stutters - 0.15 * len(off_topic)))


def sft_examples(n: int, seed: int) -> list[tuple[str, str]]:
    """n (prompt, response) demonstrations of the (mediocre) SFT corpus."""
    rng = random.Random(seed + 1)
    return [(p, sample_response(rng, topic_of(p))) for p in train_prompts(n, seed)]


def preference_pairs(n: int, seed: int, label_temperature: float = 0.05,
                     min_gap: float = 0.05) -> list[tuple[str, str, str]]:
    """n (prompt, chosen, rejected) comparisons labelled by the gold function.

    Two independent responses per prompt come from `PAIR_MIX`; the annotator
    prefers a with Bradley-Terry probability sigmoid((gold_a - gold_b) /
    label_temperature), so close calls are noisy, and skips pairs with
    |gold_a - gold_b| < min_gap as "no clear preference".
    """
    rng = random.Random(seed + 2)
    pairs: list[tuple[str, str, str]] = []
    for prompt in train_prompts(50 * n + 100, seed + 3):
        if len(pairs) == n:
            break
        a, b = (sample_response(rng, topic_of(prompt), PAIR_MIX) for _ in range(2))
        diff = gold_score(prompt, a) - gold_score(prompt, b)
        if abs(diff) < min_gap:
            continue
        p_a = 1.0 / (1.0 + math.exp(max(-50.0, min(50.0, -diff / label_temperature))))
        pairs.append((prompt, a, b) if rng.random() < p_a else (prompt, b, a))
    return pairs


def corpus_texts(seed: int) -> list[str]:
    """Texts to train the tokenizer on: every prompt, sampled responses, the vocabulary."""
    rng = random.Random(seed + 4)
    prompts = _all_prompts()
    vocab = [w for t, ws in TOPICS.items() for w in (t, *ws)]
    vocab += [*HELPFUL, *FILLER_NOUNS, *" ".join(ADJECTIVES).split(), *FUNCTION_WORDS, "well"]
    texts = [" ".join(vocab)] * 4 + [f"{w} " + " ".join(vocab) for w in vocab]
    for mix in (SFT_MIX, PAIR_MIX):
        texts += [p + sample_response(rng, topic_of(p), mix) for p in prompts]
    return texts

"""The synthetic instruction task of `rlhf demo` and its hidden gold preference.

Prompts ask for one sentence about a topic for an audience, e.g.
``"Describe the ocean for a child :\\n"``. A response is a short sentence of
space-separated words (punctuation is its own word), e.g.
``"first , the ocean has waves and coral because it also has fish ."``.

The hidden gold function (the "human") rewards, in [0, 1]:

- relevance: distinct words of the PROMPT's topic (up to 3), 0.45;
- helpfulness: distinct words from `HELPFUL` (up to 2), 0.25;
- a proper stop: exactly one "." and it is the last word, 0.15;
- a sensible length (6..16 words), 0.15;
and multiplies this by (distinct content words / content words) ** 2 and by
0.5 per word that repeats its predecessor, so repetition is punished, then subtracts 0.15 per distinct word of ANOTHER
topic. Only pairwise labels drawn from it reach the reward model.

The SFT corpus is mediocre on purpose: its most likely path at every choice
point is bland ("well , it is really nice and it is good ."; gold 0.3), while
the helpful and on-topic options are common enough (20-55 %) that sampling
from the SFT model explores them and PPO can promote them.
"""

import random
from dataclasses import dataclass, replace

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
HELPFUL = ("first", "because", "example", "specifically", "also")
FILLER_NOUNS = ("things", "stuff", "parts")
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
_HELDOUT_EVERY = 6  # one prompt in six is held out


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
    noun_repeat: float = 0.0  # a noun copies the previous noun
    and_more: float = 0.45  # continue with "and it is <adj>"
    because: float = 0.22  # continue with "because it also has <noun>"
    ramble: float = 0.10  # end with a run-on "and stuff and stuff" instead of "."
    degenerate: float = 0.0  # whole response is one word repeated


SFT_MIX = ResponseMix()
# Annotators compare responses from a broader sampler than the SFT corpus, so
# the reward model also sees repetition and off-topic words.
PAIR_MIX = ResponseMix(well=0.3, first=0.3, example=0.08, noun_other=0.15,
                       noun_repeat=0.0, ramble=0.15, degenerate=0.08)
INDEP_MIX = PAIR_MIX


def _all_prompts() -> list[tuple[int, str]]:
    """Every (index, prompt) of the task, in a fixed order."""
    prompts = [t.format(topic=topic, aud=aud) for t in TEMPLATES for topic in TOPICS
               for aud in AUDIENCES]
    return list(enumerate(prompts))


def _pool(heldout: bool) -> list[str]:
    """The train or held-out prompt pool; the two are disjoint by construction."""
    return [p for i, p in _all_prompts() if ((i * 7 + 3) % _HELDOUT_EVERY == 0) == heldout]


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


def _noun(rng: random.Random, topic: str, mix: ResponseMix, used: list[str]) -> str:
    """One noun: of the topic, of another topic, or filler; distinct unless repeated."""
    if used and rng.random() < mix.noun_repeat:
        return used[-1]
    r = rng.random()
    if r < mix.noun_topic:
        options = TOPICS[topic]
    elif r < mix.noun_topic + mix.noun_other:
        options = tuple(w for t, ws in TOPICS.items() if t != topic for w in ws)
    else:
        options = FILLER_NOUNS
    fresh = [w for w in options if w not in used] or list(options)
    return rng.choice(fresh)


def _clause(rng: random.Random, topic: str, mix: ResponseMix, subject_it: bool,
            used: list[str]) -> list[str]:
    """ "is <adjective>" or "has <noun> and <noun>"; nouns are appended to used."""
    p_has = mix.has_after_it if subject_it else mix.has_after_topic
    if rng.random() >= p_has:
        return ["is", *rng.choice(ADJECTIVES[:2]).split()]
    first = _noun(rng, topic, mix, used)
    second = _noun(rng, topic, mix, used + [first])
    used += [first, second]
    return ["has", first, "and", second]


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
    used: list[str] = []
    words = opener + (["it"] if subject_it else ["the", topic])
    words += _clause(rng, topic, mix, subject_it, used)
    r = rng.random()
    if r < mix.and_more:
        adjectives = [a for a in ADJECTIVES if a.split()[0] not in words]
        words += ["and", "it", "is", *rng.choice(adjectives).split()]
    elif r < mix.and_more + mix.because:
        words += ["because", "it", "also", "has", _noun(rng, topic, mix, used)]
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


def _swap_noun(rng: random.Random, topic: str, words: list[str]) -> None:
    """Replace one noun by a word of another topic (p 0.7), of the topic, or a filler."""
    nouns = [i for i, w in enumerate(words) if w in _WORD_TOPIC or w in FILLER_NOUNS]
    others = [w for t, ws in TOPICS.items() if t != topic for w in ws]
    pool = others if rng.random() < 0.7 else rng.choice((TOPICS[topic], FILLER_NOUNS))
    words[rng.choice(nouns)] = rng.choice(pool)


def _change_topic(rng: random.Random, topic: str, words: list[str]) -> None:
    """Replace every noun by a word of one other topic (a fluent but irrelevant answer)."""
    other = TOPICS[rng.choice([t for t in TOPICS if t != topic])]
    nouns = [i for i, w in enumerate(words) if w in _WORD_TOPIC or w in FILLER_NOUNS]
    for i, w in zip(nouns, rng.sample(other, len(nouns))):
        words[i] = w


def _swap_opener(rng: random.Random, topic: str, words: list[str]) -> None:
    """Replace the opener ("well ,", "first ,", "for example ," or none) by another."""
    cut = words.index(",") + 1 if "," in words[:3] else 0
    words[:cut] = rng.choice((["well", ","], ["first", ","], ["for", "example", ","], []))


def _stutter(rng: random.Random, topic: str, words: list[str]) -> None:
    """Say one word twice in a row."""
    i = rng.randrange(len(words))
    words.insert(i, words[i])


def _drop_stop(rng: random.Random, topic: str, words: list[str]) -> None:
    """Replace the final "." by a run-on."""
    words[-1:] = ["and", "stuff"] * rng.randint(1, 3) if words[-1] == "." else ["."]


_REVISIONS = (_swap_noun,) * 3 + (_change_topic,) * 2 + (_swap_opener, _stutter, _drop_stop)


def revise_response(rng: random.Random, topic: str, response: str) -> str:
    """response with one edit: a noun swapped (3/8), all nouns moved to another
    topic (2/8), the opener changed, a word stuttered or the stop dropped (1/8
    each), so that a comparison with the original isolates one property of the
    gold function."""
    words = response.split()
    has_noun = any(w in _WORD_TOPIC or w in FILLER_NOUNS for w in words)
    edits = [e for e in _REVISIONS if has_noun or e not in (_swap_noun, _change_topic)]
    rng.choice(edits)(rng, topic, words)
    return " ".join(words)


def preference_pairs(n: int, seed: int, label_temperature: float = 0.05,
                     min_gap: float = 0.05, revision_rate: float = 0.8
                     ) -> list[tuple[str, str, str]]:
    """n (prompt, chosen, rejected) comparisons labelled by the gold function.

    With probability revision_rate a pair is an SFT-like response and a one-edit
    revision of it (`revise_response`: each property compared with all else
    equal, which a tiny reward model needs to learn prompt relevance); otherwise
    two independent responses from `PAIR_MIX`. The annotator prefers a with
    Bradley-Terry probability sigmoid((gold_a - gold_b) / label_temperature),
    so close calls are noisy; pairs with |gold_a - gold_b| < min_gap count as
    "no clear preference" and are skipped, as annotators' ties are.
    """
    rng = random.Random(seed + 2)
    pairs: list[tuple[str, str, str]] = []
    prompts = iter(train_prompts(50 * n + 100, seed + 3))
    while len(pairs) < n:
        prompt = next(prompts)
        topic = topic_of(prompt)
        if rng.random() < revision_rate:
            a = sample_response(rng, topic, SFT_MIX)
            b = revise_response(rng, topic, a)
        else:
            a, b = (sample_response(rng, topic, INDEP_MIX) for _ in range(2))
        diff = gold_score(prompt, a) - gold_score(prompt, b)
        if abs(diff) < min_gap:
            continue
        p_a = 1.0 / (1.0 + 2.718281828 ** (-diff / label_temperature))
        pairs.append((prompt, a, b) if rng.random() < p_a else (prompt, b, a))
    return pairs


def corpus_texts(seed: int) -> list[str]:
    """Texts to train the tokenizer on: every prompt, sampled responses, the vocabulary."""
    rng = random.Random(seed + 4)
    prompts = [p for _, p in _all_prompts()]
    vocab = [w for t, ws in TOPICS.items() for w in (t, *ws)]
    vocab += [*HELPFUL, *FILLER_NOUNS, *" ".join(ADJECTIVES).split(), *FUNCTION_WORDS, "well"]
    texts = [" ".join(vocab)] * 4 + [f"{w} " + " ".join(vocab) for w in vocab]
    for mix in (SFT_MIX, PAIR_MIX):
        texts += [p + sample_response(rng, topic_of(p), mix) for p in prompts]
    return texts

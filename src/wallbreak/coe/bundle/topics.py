"""A fixed list of topics, and prompts about them, for experts made by `bundle synth --like`: each
expert gets a topic, a description and example prompts, so a router has one class per expert to
learn, and held-out prompts (other phrasings) to be scored on. The list is fixed so that a bundle
and its held-out set agree on every machine."""

from __future__ import annotations

TOPICS: tuple[str, ...] = (
    "tax law", "contract law", "criminal procedure", "patent filing", "employment law",
    "immigration visas", "family law", "real estate closing", "bankruptcy", "copyright licensing",
    "cardiology", "dermatology", "pediatrics", "oncology", "orthopedics",
    "nutrition", "sleep medicine", "dentistry", "ophthalmology", "pharmacology",
    "veterinary care for dogs", "cat behaviour", "aquarium fish keeping", "beekeeping", "horse riding",
    "organic gardening", "houseplants", "lawn care", "composting", "bonsai trees",
    "sourdough baking", "french pastry", "barbecue smoking", "vegan cooking", "japanese cuisine",
    "coffee brewing", "wine tasting", "craft beer brewing", "cocktail mixing", "tea ceremonies",
    "python programming", "rust programming", "javascript frameworks", "sql databases",
    "linux administration", "kubernetes clusters", "network security", "cryptography",
    "compiler design", "embedded firmware",
    "machine learning", "computer vision", "speech recognition", "robotics", "quantum computing",
    "video game design", "3d modelling", "web accessibility", "mobile app design", "data visualisation",
    "calculus", "linear algebra", "probability theory", "number theory", "topology",
    "statistics", "game theory", "graph theory", "differential equations", "geometry proofs",
    "classical mechanics", "thermodynamics", "electromagnetism", "optics", "nuclear physics",
    "astronomy", "planetary science", "climate science", "oceanography", "volcanology",
    "organic chemistry", "biochemistry", "genetics", "microbiology", "ecology",
    "marine biology", "ornithology", "entomology", "botany", "paleontology",
    "ancient rome", "medieval europe", "the ming dynasty", "the french revolution", "the cold war",
    "egyptology", "the industrial revolution", "world war one", "the silk road", "aztec civilisation",
    "greek philosophy", "existentialism", "ethics", "logic puzzles", "philosophy of mind",
    "poetry writing", "screenwriting", "novel plotting", "grammar and punctuation", "translation to spanish",
    "learning german", "mandarin characters", "japanese grammar", "latin roots", "sign language",
    "personal finance", "stock investing", "retirement planning", "cryptocurrency",
    "small business accounting",
    "marketing strategy", "job interviews", "resume writing", "negotiation", "project management",
    "jazz harmony", "guitar technique", "piano practice", "music production", "opera history",
    "oil painting", "watercolour", "photography", "film history", "architecture styles",
    "marathon training", "weightlifting", "yoga", "chess openings", "rock climbing",
    "sailing", "cycling repair", "fly fishing", "skiing technique", "soccer tactics",
    "car maintenance", "electric vehicles", "home plumbing", "woodworking", "knitting",
    "travel in japan", "hiking in the alps", "camping gear", "aviation", "space exploration",
)  # fmt: skip

TRAIN_TEMPLATES: tuple[str, ...] = (
    "I have a question about {topic}.",
    "Explain the basics of {topic} to a beginner.",
    "What are common mistakes people make in {topic}?",
    "Give me three tips on {topic}.",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "Can you help me understand something in {topic}?",
    "What should an expert in {topic} know that most people do not?",
)


def topic(i: int) -> str:
    """The i-th expert's topic (the list repeats, numbered, past its end)."""
    t = TOPICS[i % len(TOPICS)]
    return t if i < len(TOPICS) else f"{t} ({i // len(TOPICS) + 1})"


def description(i: int) -> str:
    return f"An expert in {topic(i)}: answers questions about {topic(i)}."


def examples(i: int) -> list[str]:
    return [t.format(topic=topic(i)) for t in TRAIN_TEMPLATES]


def heldout(i: int) -> list[str]:
    return [t.format(topic=topic(i)) for t in HELDOUT_TEMPLATES]

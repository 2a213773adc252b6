#!/usr/bin/env python3
"""Writes the demo's synthetic emotion corpus, demo/corpus.csv (standard library only, seeded,
deterministic: the same bytes on every run).

Short first-person event descriptions in the style of crowd-enVENT (Troiano et al. 2023), with
the emotion words left out, one of its 13 emotions each (`no-emotion` spelled `neutral`, as
patchbay's `envent` preset renames it) and nine of its appraisal ratings (1-5, same column
names). Nothing is copied from crowd-enVENT: every sentence is built from the phrase lists below.

How the text encodes the labels:
- the emotion follows from the event's structure, as appraisal theory has it, and the event
  frames share their parts across emotions so that no single word gives the answer: the same
  harm is anger when another person does it to me and guilt when I do it to another
  ("my brother broke my camera on purpose" / "I broke my brother's camera and said nothing");
  the same threat is fear or relief depending on how it ends; the same lost ring is sadness or
  relief; "in front of my colleagues" is shame after a blunder and pride after praise; lending
  my car to my sister is trust, her wrecking it is anger;
- the ratings are computed from the parts of the text: who caused the event sets the three
  responsibility ratings, the frame sets pleasantness, and optional phrases set suddenness
  ("all of a sudden" / "as planned weeks ago"), goal relevance, control, attention and effort;
  every rating then gets rater noise (+-1 with probability 0.3), so no rating is exact.

Columns: id, split (`train`: the rows scripts/demo/train.py trains the model on; `test`: held
out, the rows `patchbay demo` evaluates on), emotion, text, then the ratings. 400 rows per
emotion, 100 of them held out; no text occurs twice.

    python3 scripts/demo/make_corpus.py          # writes demo/corpus.csv
"""
import csv
import io
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "demo" / "corpus.csv"
SEED = 2025
PER_EMOTION = 400
TEST_PER_EMOTION = 100

DIMS = ["suddenness", "pleasantness", "goal_relevance", "self_responsblt", "other_responsblt",
        "chance_responsblt", "self_control", "attention", "effort"]

# Prototype ratings per emotion, in DIMS order (appraisal-theory profiles, 1-5). A data table:
# its rows look alike to a duplicate scan by shape only (intended).
PROTO = {
    "anger":    (4, 1, 4, 1, 5, 1, 2, 4, 3),
    "boredom":  (1, 2, 1, 2, 2, 3, 3, 1, 2),
    "disgust":  (4, 1, 2, 1, 4, 2, 2, 4, 2),
    "fear":     (5, 1, 5, 1, 2, 4, 1, 5, 4),
    "guilt":    (3, 1, 4, 5, 1, 1, 4, 4, 3),
    "joy":      (3, 5, 5, 2, 3, 3, 3, 4, 2),
    "neutral":  (1, 3, 1, 4, 1, 1, 5, 2, 1),
    "pride":    (2, 5, 5, 5, 1, 1, 4, 4, 5),
    "relief":   (3, 4, 5, 1, 2, 4, 2, 4, 3),
    "sadness":  (3, 1, 5, 1, 2, 5, 1, 4, 3),
    "shame":    (4, 1, 4, 4, 2, 1, 2, 5, 3),
    "surprise": (5, 4, 3, 1, 3, 4, 2, 5, 1),
    "trust":    (1, 4, 4, 2, 5, 1, 3, 3, 2),
}
EMOTIONS = sorted(PROTO)

# Who caused it -> (self, other, chance) responsibility.
AGENT = {"self": (5, 1, 1), "other": (1, 5, 1), "chance": (1, 1, 5), "mixed": (4, 3, 1)}

PEOPLE = ["my neighbour", "my boss", "my brother", "my sister", "my best friend", "a colleague",
          "my landlord", "my flatmate", "my cousin", "my partner", "my teacher", "my uncle",
          "my coach", "a classmate", "my aunt"]
THINGS = ["car", "bike", "phone", "laptop", "camera", "guitar", "watch", "coat", "umbrella",
          "lamp", "vase", "headphones", "glasses", "printer", "tent"]
HARMS = ["broke", "scratched", "damaged", "lost", "ruined", "cracked", "spilled coffee on", "dropped"]
VALUABLES = ["my grandmother's ring", "my passport", "my wallet", "the key to the house",
             "my wedding ring", "the old photo of my father", "my bank card", "my lucky necklace"]
PLACES = ["in my coat", "under the bed", "in the car", "at the bottom of my bag", "behind the sofa",
          "in the garden"]
AUDIENCES = ["the whole class", "all my colleagues", "everyone at the party", "a full room",
             "my new team", "the whole family", "my boss", "the other parents"]
THREATS = ["I heard footsteps behind me in a dark street", "a large dog ran at me in the park",
           "the plane shook hard in the storm", "the doctor called about my test results",
           "my car slid on the ice", "someone knocked at my door at midnight",
           "smoke came out of the kitchen", "my little son disappeared in the crowd",
           "the bank called about strange payments from my account", "the lights went out in the lift",
           "the river rose up to our front door", "a man with a knife walked into the shop"]


def possessive(p):
    return p + "'s"


def pick(rng, xs):
    return xs[rng.randrange(len(xs))]


# Each frame returns (text, agent, overrides): overrides are DIMS entries the frame itself sets.
def anger(rng):
    p = pick(rng, PEOPLE)
    if rng.random() < 0.55:
        tail = pick(rng, ["on purpose", "and laughed about it", "and blamed me for it",
                          "and refused to pay for it", "and did not even say sorry", "and then lied about it"])
        return f"{p} {pick(rng, HARMS)} my {pick(rng, THINGS)} {tail}", "other", {}
    act = pick(rng, ["took the credit for my work", "cut in front of me in the queue",
                     "shouted at me for no reason", "read my private messages",
                     "kept my deposit without a reason", "told everyone my secret",
                     "cancelled our plans at the last minute again", "parked across my driveway again",
                     "called me lazy in front of my team", "lied to me about the money",
                     "ignored my calls for a week", "forgot my birthday again"])
    return f"{p} {act}", "other", {}


def guilt(rng):
    p = pick(rng, PEOPLE)
    if rng.random() < 0.55:
        tail = pick(rng, ["and said nothing", "and blamed someone else", "and never told them",
                          "and hid it from them", "and pretended it was not me", "when I borrowed it"])
        return f"I {pick(rng, HARMS)} {possessive(p)} {pick(rng, THINGS)} {tail}", "self", {}
    act = pick(rng, ["shouted at {p} for no reason", "lied to {p} about the money", "forgot the birthday of {p}",
                     "read the private messages of {p}", "broke a promise to {p}",
                     "took the credit for the work of {p}", "cancelled my plans with {p} at the last minute again",
                     "ignored the calls of {p} for a week", "told everyone the secret of {p}"])
    return "I " + act.format(p=p), "self", {}


def shame(rng):
    if rng.random() < 0.7:
        act = pick(rng, ["tripped and fell", "forgot all my lines", "gave a completely wrong answer",
                         "spilled my drink over myself", "was caught cheating on a test",
                         "was told off by the manager", "could not remember my own address",
                         "sang badly out of tune", "showed up in the wrong clothes", "mixed up the names of my guests"])
        return f"I {act} in front of {pick(rng, AUDIENCES)}", "mixed", {}
    secret = pick(rng, ["had failed the exam twice", "had lied on my CV", "had cheated in the quiz",
                        "had copied my essay from the internet", "still could not swim"])
    return f"{pick(rng, PEOPLE)} found out that I {secret}", "mixed", {}


def pride(rng):
    if rng.random() < 0.65:
        goal = pick(rng, ["finished the city marathon", "won the chess tournament", "passed my driving test",
                          "built a wooden table", "finished my first novel", "got the top mark in the final exam",
                          "learned to play a whole song on the guitar", "got promoted at work",
                          "gave a speech to the whole school", "repaired the old car", "ran my own bakery for a year"])
        effort = rng.random() < 0.5
        tail = pick(rng, [" after months of training", " after years of hard work", " on my own"]) if effort else ""
        return f"I {goal}{tail}", "self", {"effort": 5} if effort else {"effort": 4}
    work = pick(rng, ["my report", "my project", "the way I handled the crisis", "my painting", "my speech"])
    return f"{pick(rng, PEOPLE)} praised me for {work} in front of {pick(rng, AUDIENCES)}", "mixed", {}


def joy(rng):
    if rng.random() < 0.5:
        gift = pick(rng, ["tickets for my favourite band", "a little puppy", "a beautiful painting", "a new bike",
                          "flowers and a long letter", "a weekend trip to the sea", "a new camera"])
        return f"{pick(rng, PEOPLE)} {pick(rng, ['gave', 'sent', 'bought'])} me {gift}", "other", {}
    news = pick(rng, ["my sister had a healthy baby girl", "we won a holiday in a raffle",
                      "my best friend came home after a year abroad",
                      "my whole family met for dinner for the first time in years",
                      "the sun came out on the day of our wedding", "our team won the final",
                      "we moved into our first own house", "my uncle invited us to his lake house",
                      "my grandfather got well again", "it was the first warm day of spring"])
    return news, "chance", {}


def fear(rng):
    end = pick(rng, ["nobody was around", "I did not know what would happen", "I could not move",
                     "I waited for the worst", "there was nobody to help me", "I could not call anyone"])
    return f"{pick(rng, THREATS)} and {end}", "chance", {}


def relief(rng):
    if rng.random() < 0.6:
        end = pick(rng, ["it was only my neighbour", "in the end nothing happened", "everyone was safe",
                         "it turned out to be nothing", "it all ended well", "help came just in time",
                         "the problem was solved the next day"])
        return f"{pick(rng, THREATS)}, but {end}", "chance", {}
    return f"I thought I had lost {pick(rng, VALUABLES)}, but I found it {pick(rng, PLACES)}", "chance", {}


def sadness(rng):
    r = rng.random()
    if r < 0.3:
        return f"I lost {pick(rng, VALUABLES)} and never found it again", "chance", {}
    if r < 0.45:
        return f"{pick(rng, PEOPLE)} told me that they would move far away for good", "chance", {}
    loss = pick(rng, ["my old dog died", "my grandmother passed away", "my best friend moved to another country",
                      "we had to sell the family house", "my partner left me", "my father got very ill",
                      "I had to say goodbye to my team", "my childhood home was torn down",
                      "my cat never came back home", "our team lost the final"])
    return loss, "chance", {}


def disgust(rng):
    r = rng.random()
    if r < 0.45:
        gross = pick(rng, ["a long hair", "a dead fly", "a worm", "green mould", "a used plaster", "a cockroach"])
        where = pick(rng, ["my soup", "my salad", "the bread", "my sandwich", "the hotel bed", "my coffee"])
        return f"I found {gross} in {where}", "other", {}
    if r < 0.75:
        act = pick(rng, ["spat on the floor of the bus", "picked his nose at the dinner table",
                         "left rotten food in the fridge for weeks", "coughed right into my plate",
                         "never cleaned the toilet and it smelled awful", "licked the plates at dinner"])
        return f"{pick(rng, PEOPLE)} {act}", "other", {}
    place = pick(rng, ["the toilets at the station were covered in dirt", "the hotel room smelled of old smoke and sweat",
                       "the bins behind the shop were full of rats", "the kitchen of the cafe was full of grease and flies"])
    return place, "other", {}


def surprise(rng):
    far = pick(rng, ["in another country", "on a tiny island", "at an airport far from home", "in a village in the mountains"])
    r = rng.random()
    if r < 0.3:
        return f"I met {pick(rng, PEOPLE)} by chance {far}", "chance", {}
    if r < 0.5:
        star = pick(rng, ["a famous singer", "a champion boxer", "a millionaire", "the author of my favourite book"])
        return f"{pick(rng, PEOPLE)} turned out to be {star}", "chance", {}
    if r < 0.7:
        old = pick(rng, ["a letter from my grandfather", "a photo of my parents as children", "a hundred euros", "my first school report"])
        where = pick(rng, ["in an old book", "behind a painting", "in the pocket of an old coat", "under the floor"])
        return f"I found {old} {where}", "chance", {}
    event = pick(rng, ["my old teacher sat next to me on the plane", "my quiet neighbour started to sing opera",
                       "it snowed in the middle of July", "a stranger knew my name", "the old shop on my street became a zoo",
                       "my phone rang and it was a friend from school", "a parrot landed on my shoulder in the park",
                       "the lights of the whole city went green for a minute"])
    return event, "chance", {}


def trust(rng):
    p = pick(rng, PEOPLE)
    act = pick(rng, ["gave my keys to {p} while I was away", "let {p} drive my car", "told {p} a secret that nobody else knows",
                     "asked {p} to look after my children", "let {p} borrow my {t}", "left my dog with {p} for the weekend",
                     "asked {p} to check my report before I sent it", "let {p} handle my money"])
    tail = pick(rng, ["", "", " and I knew it would be fine", " without a second thought",
                      " because I know I can count on them", " as I always do"])
    return "I " + act.format(p=p, t=pick(rng, THINGS)) + tail, "other", {}


def boredom(rng):
    act = pick(rng, ["sat through a long meeting about nothing", "waited at the station for hours",
                     "watched the rain all afternoon with nothing to do", "sorted the same papers again all day",
                     "listened to a lecture I had heard many times", "stood in a queue that did not move",
                     "spent the whole weekend at home with nothing to do", "had to fill in the same form for the third time",
                     "watched my cousin play the same video game for hours"])
    tail = pick(rng, ["", "", " and time went very slowly", " and nothing happened"])
    return f"I {act}{tail}", "chance", {"attention": 1}


def neutral(rng):
    if rng.random() < 0.8:
        act = pick(rng, ["walked to the shop to buy bread", "took the bus to work", "read the news on my phone",
                         "cleaned the kitchen", "paid the electricity bill", "charged my phone", "watered the plants",
                         "did the laundry", "made a cup of tea", "checked my emails", "parked the car in the usual place",
                         "returned a book to the library", "cooked rice for dinner"])
        return f"I {act}", "self", {}
    act = pick(rng, ["asked me what time it was", "sent me the address of the meeting", "borrowed a pen from me",
                     "told me the bus was on time", "asked me for the salt"])
    return f"{pick(rng, PEOPLE)} {act}", "other", {"self_control": 4}


FRAMES = {"anger": anger, "boredom": boredom, "disgust": disgust, "fear": fear, "guilt": guilt, "joy": joy,
          "neutral": neutral, "pride": pride, "relief": relief, "sadness": sadness, "shame": shame,
          "surprise": surprise, "trust": trust}

OPENERS = ["Yesterday", "Last week", "This morning", "On Monday", "Last summer", "Tonight", "A few days ago",
           "Last year", "After work", "At the weekend", "One evening", "In the spring"]
# Optional phrases: (dimension, value, phrases).
SUDDEN = [(5, ["all of a sudden", "out of nowhere"]), (4, ["without any warning"]),
          (2, ["after a long wait"]), (1, ["as expected", "as planned weeks ago"])]
TAILS = [
    ("goal_relevance", 5, ["and it meant a lot to me", "and it mattered so much to me"]),
    ("goal_relevance", 1, ["but it did not really matter to me", "though it was not important to me"]),
    ("self_control", 5, ["and I could do something about it"]),
    ("self_control", 1, ["and there was nothing I could do"]),
    ("attention", 5, ["and I could not stop thinking about it"]),
    ("attention", 1, ["and I hardly paid attention"]),
]


def example(rng, emotion):
    core, agent, overrides = FRAMES[emotion](rng)
    ratings = dict(zip(DIMS, PROTO[emotion]))
    ratings.update(zip(["self_responsblt", "other_responsblt", "chance_responsblt"], AGENT[agent]))
    ratings.update(overrides)
    # A suddenness phrase within 1 of the emotion's prototype (a sudden scare, a planned chore).
    prefix = ""
    if rng.random() < 0.4 and "suddenness" not in overrides:
        proto = PROTO[emotion][0]
        near = [(v, phrases) for v, phrases in SUDDEN if abs(v - proto) <= 1]
        value, phrases = pick(rng, near)
        ratings["suddenness"] = value
        prefix = pick(rng, phrases)
    opener = pick(rng, OPENERS) if rng.random() < 0.7 else ""
    lead = ", ".join(x for x in [opener, prefix] if x)
    text = f"{lead}, {core}" if lead else core
    text = text[0].upper() + text[1:]
    # A tail phrase setting another rating, within 1 of the prototype.
    if rng.random() < 0.35:
        proto = dict(zip(DIMS, PROTO[emotion]))
        near = [t for t in TAILS if t[0] not in overrides and abs(t[1] - proto[t[0]]) <= 1]
        dim, value, phrases = pick(rng, near)
        ratings[dim] = value
        text += ", " + pick(rng, phrases)
    text += "."
    # Rater noise.
    for d in DIMS:
        if rng.random() < 0.3:
            ratings[d] = min(5, max(1, ratings[d] + rng.choice([-1, 1])))
    return text, [ratings[d] for d in DIMS]


def main():
    rng = random.Random(SEED)
    seen = set()
    rows = []
    for emotion in EMOTIONS:
        made = 0
        while made < PER_EMOTION:
            text, ratings = example(rng, emotion)
            if text in seen:
                continue
            seen.add(text)
            split = "test" if made < TEST_PER_EMOTION else "train"
            rows.append([split, emotion, text, *ratings])
            made += 1
    rng.shuffle(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "split", "emotion", "text", *DIMS])
    for i, r in enumerate(rows):
        w.writerow([i, *r])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(buf.getvalue().encode("utf-8"))
    print(f"wrote {len(rows)} rows ({TEST_PER_EMOTION * len(EMOTIONS)} held out) to {OUT}")


if __name__ == "__main__":
    main()

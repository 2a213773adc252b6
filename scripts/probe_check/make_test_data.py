#!/usr/bin/env python3
"""Writes the small synthetic emotion dataset of the tests (standard library only, seeded):

  tests/data/emotions.csv         UTF-8, 196 rows: id, round, emotion, text, and three
                                  appraisal ratings (pleasantness, self_responsblt, suddenness)
  tests/data/emotions_cp1252.csv  the same rows encoded in Windows-1252 (the texts contain
                                  curly quotes, accents, the euro and pound signs)

Seven emotions (one spelled `no-emotion`, renamed to `neutral` in the tests), 28 rows each.
The appraisals depend on the emotion plus noise, so a probe has something to find.
"""
import csv
import io
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "tests" / "data"

EVENTS = {
    "anger": ["someone scratched my car and drove off", "my landlord kept the deposit for no reason",
              "a man cut in front of me in the queue at the café", "my coworker took credit for my work",
              "the shop charged me €40 twice and refused to fix it"],
    "joy": ["I got the job I wanted", "my friend threw me a surprise party",
            "we won the final match of the season", "my sister had a healthy baby",
            "I passed my driving test at the first try"],
    "fear": ["I heard footsteps behind me at night", "the plane shook hard during the storm",
             "a dog ran at me in the park", "the doctor called about my test results",
             "my brakes failed on the motorway"],
    "sadness": ["my old dog died last week", "my best friend moved to another country",
                "I lost my grandmother’s ring", "we had to sell the family house",
                "my team lost and I let everyone down"],
    "pride": ["I finished my first marathon", "my paper was accepted at the conference",
              "I built a table with my own hands", "my son graduated with honours",
              "I was promoted after years of work"],
    "guilt": ["I forgot my mother’s birthday", "I lied to my friend about the money",
              "I broke my neighbour’s window and said nothing", "I was rude to a waiter",
              "I missed my daughter’s school play"],
    "no-emotion": ["I walked to the shop to buy bread", "I took the bus to work as usual",
                   "I read the news on my phone", "I paid the £3 bill at the café",
                   "I cleaned the kitchen in the morning"],
}
OPENERS = ["Yesterday", "Last week", "This morning", "On Monday", "After lunch", "Last year", "Tonight"]
ENDINGS = ["", " and I kept thinking about it", " – it was a “big” day", " and told my naïve cousin", " before dinner"]
# Mean appraisal (pleasantness, self responsibility, suddenness) per emotion, on 1-5.
MEANS = {
    "anger": (1.5, 1.5, 4.0), "joy": (4.7, 3.0, 3.0), "fear": (1.3, 1.5, 4.5), "sadness": (1.4, 2.0, 3.0),
    "pride": (4.6, 4.6, 2.0), "guilt": (1.8, 4.7, 2.5), "no-emotion": (3.0, 3.0, 1.5),
}


def main():
    rng = random.Random(5)
    rows = []
    i = 0
    for emotion, events in EVENTS.items():
        for j in range(28):
            event = events[j % len(events)]
            text = f"{rng.choice(OPENERS)} {event}{rng.choice(ENDINGS)}."
            vals = [min(5, max(1, round(m + rng.gauss(0, 0.8)))) for m in MEANS[emotion]]
            rows.append([i, f"round-{1 + j % 2}", emotion, text, *vals])
            i += 1
    rng.shuffle(rows)
    header = ["id", "round", "emotion", "text", "pleasantness", "self_responsblt", "suddenness"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    text = buf.getvalue()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "emotions.csv").write_bytes(text.encode("utf-8"))
    (OUT / "emotions_cp1252.csv").write_bytes(text.encode("cp1252"))
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()

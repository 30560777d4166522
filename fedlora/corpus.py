"""The embedded default data: a generated, labelled corpus of short clinical notes.

Notes are built from templates with specialty vocabulary, but also share generic
symptoms, vitals, comorbidities and plans across specialties, include some
deliberately ambiguous notes and carry a fraction of flipped labels. That keeps
the task learnable yet clearly short of 100% accuracy, like real triage data.
Hospitals see different specialty mixes, so ``column:hospital`` is non-IID.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import datasets

CLINICAL_LABELS: tuple[str, ...] = (
    "cardiology",
    "respiratory",
    "gastroenterology",
    "neurology",
    "musculoskeletal",
)

# Per specialty: presenting complaints, exam/investigation findings, relevant
# history and plans. Some complaints deliberately recur across specialties
# (chest pain, breathlessness, dizziness, nausea, back pain) as in real triage.
_SPECIALTY: dict[str, dict[str, tuple[str, ...]]] = {
    "cardiology": {
        "complaint": (
            "central chest pain radiating to left arm", "palpitations",
            "exertional chest tightness", "breathlessness on exertion",
            "ankle swelling", "syncope while walking", "dizziness",
            "orthopnoea", "chest pain",
        ),
        "finding": (
            "ECG shows ST depression in V4-V6", "troponin mildly raised",
            "irregularly irregular pulse", "pansystolic murmur at the apex",
            "bibasal crackles and raised JVP", "pitting oedema to mid-shin",
            "echo shows reduced ejection fraction", "ECG shows atrial fibrillation",
        ),
        "history": (
            "previous myocardial infarction", "known atrial fibrillation on apixaban",
            "heart failure", "prior coronary stent", "family history of IHD",
        ),
        "plan": (
            "start aspirin and refer for angiography", "rate control with bisoprolol",
            "uptitrate furosemide", "arrange echocardiogram", "refer to cardiology clinic",
            "24-hour Holter monitor",
        ),
    },
    "respiratory": {
        "complaint": (
            "productive cough with green sputum", "wheeze", "shortness of breath",
            "haemoptysis", "pleuritic chest pain", "worsening breathlessness",
            "nocturnal cough", "chest pain",
        ),
        "finding": (
            "coarse crackles at the right base", "widespread expiratory wheeze",
            "chest x-ray shows right lower lobe consolidation", "peak flow 60% of predicted",
            "reduced air entry on the left", "spirometry shows obstructive pattern",
            "oxygen saturation 91% on air", "dull percussion note at the left base",
        ),
        "history": (
            "COPD", "asthma since childhood", "40 pack-year smoking history",
            "recent viral illness", "bronchiectasis",
        ),
        "plan": (
            "start amoxicillin and clarithromycin", "salbutamol nebulisers and prednisolone",
            "refer for CT pulmonary angiogram", "sputum culture sent",
            "inhaler technique reviewed", "refer to respiratory clinic",
        ),
    },
    "gastroenterology": {
        "complaint": (
            "epigastric pain after meals", "rectal bleeding", "persistent diarrhoea",
            "vomiting", "difficulty swallowing", "abdominal bloating",
            "right upper quadrant pain", "nausea", "chest pain after eating",
        ),
        "finding": (
            "tender in the epigastrium", "raised ALT and bilirubin",
            "ultrasound shows gallstones", "positive faecal immunochemical test",
            "soft abdomen with hypoactive bowel sounds", "melaena on rectal exam",
            "iron deficiency anaemia", "calprotectin raised",
        ),
        "history": (
            "Crohn's disease", "heavy alcohol use", "reflux on omeprazole",
            "previous cholecystectomy", "coeliac disease",
        ),
        "plan": (
            "refer for upper GI endoscopy", "start a proton pump inhibitor",
            "book colonoscopy", "stool cultures sent", "refer to gastroenterology clinic",
            "trial of low FODMAP diet",
        ),
    },
    "neurology": {
        "complaint": (
            "sudden severe headache", "weakness of the right arm", "slurred speech",
            "a first seizure", "numbness and tingling in both feet", "double vision",
            "recurrent migraine with aura", "dizziness", "tremor",
        ),
        "finding": (
            "left-sided facial droop", "reduced power 3/5 in the right arm",
            "CT head shows no bleed", "brisk reflexes and upgoing plantar",
            "nystagmus on lateral gaze", "resting pill-rolling tremor",
            "reduced sensation in a glove and stocking distribution", "neck stiffness",
        ),
        "history": (
            "epilepsy on levetiracetam", "previous transient ischaemic attack",
            "multiple sclerosis", "Parkinson's disease", "migraine",
        ),
        "plan": (
            "urgent MRI brain", "refer to stroke team", "start levetiracetam",
            "refer to neurology clinic", "nerve conduction studies",
            "lumbar puncture arranged",
        ),
    },
    "musculoskeletal": {
        "complaint": (
            "low back pain after lifting", "painful swollen knee", "shoulder pain on reaching",
            "hip pain when walking", "morning stiffness in the hands", "neck pain",
            "ankle injury playing football", "back pain",
        ),
        "finding": (
            "reduced range of movement at the shoulder", "knee effusion with joint line tenderness",
            "x-ray shows joint space narrowing", "tender over the lumbar paraspinal muscles",
            "positive straight leg raise", "synovitis of the MCP joints",
            "bruising over the lateral malleolus", "raised CRP and rheumatoid factor positive",
        ),
        "history": (
            "osteoarthritis", "rheumatoid arthritis on methotrexate", "gout",
            "previous knee replacement", "osteoporosis",
        ),
        "plan": (
            "refer to physiotherapy", "steroid injection offered", "refer to orthopaedics",
            "start naproxen with PPI cover", "refer to rheumatology clinic",
            "knee brace and activity modification",
        ),
    },
}

# Vocabulary any specialty may use: it carries no label signal on its own.
_SHARED: dict[str, tuple[str, ...]] = {
    "complaint": (
        "fatigue", "fever", "generalised pain", "malaise", "weight loss",
        "poor appetite", "night sweats", "feeling unwell",
    ),
    "finding": (
        "alert and oriented", "no acute distress", "bloods pending",
        "examination otherwise unremarkable", "mildly dehydrated",
        "CRP mildly raised", "full blood count normal",
    ),
    "history": (
        "hypertension", "type 2 diabetes", "obesity", "hyperlipidaemia",
        "chronic kidney disease", "ex-smoker", "depression", "hypothyroidism",
    ),
    "plan": (
        "simple analgesia", "review in two weeks", "safety-netting advice given",
        "repeat bloods", "follow up with GP", "admit for observation",
        "discharge with advice",
    ),
}

_DURATIONS = ("2 days", "3 days", "a week", "2 weeks", "a month", "several months")


def generate_clinical_corpus(
    num_samples: int = 1500,
    seed: int = 0,
    label_noise: float = 0.08,
    num_hospitals: int = 5,
) -> datasets.Dataset:
    """Generate ``num_samples`` clinical notes with ``text``, ``label`` and ``hospital``.

    Classes are balanced before ``label_noise`` (the fraction of labels flipped
    to another class). Each hospital favours one specialty, so hospitals have
    different class mixes. Same seed, same dataset.
    """
    if num_samples < 1 or num_hospitals < 1:
        raise ValueError("num_samples and num_hospitals must be at least 1")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError("label_noise must be between 0 and 1")
    rng = random.Random(seed)
    labels = [CLINICAL_LABELS[i % len(CLINICAL_LABELS)] for i in range(num_samples)]
    rng.shuffle(labels)
    hospitals = list(range(1, num_hospitals + 1))
    texts, sites = [], []
    for label in labels:
        texts.append(_note(rng, label))
        # A hospital is three times likelier to see its own specialty's patients.
        weights = [3 if _specialty_of(h) == label else 1 for h in hospitals]
        sites.append(f"hospital-{rng.choices(hospitals, weights)[0]}")
    # A separate stream, so the notes stay the same whatever the noise level.
    noise_rng = random.Random(f"{seed}:label-noise")
    noisy_labels = [
        noise_rng.choice([other for other in CLINICAL_LABELS if other != label])
        if noise_rng.random() < label_noise
        else label
        for label in labels
    ]
    return datasets.Dataset.from_dict(
        {"text": texts, "label": noisy_labels, "hospital": sites}
    )


def write_corpus(path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`generate_clinical_corpus` (with ``kwargs``) to ``path`` as CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generate_clinical_corpus(**kwargs).to_csv(path, index=False)
    return path


def _specialty_of(hospital: int) -> str:
    return CLINICAL_LABELS[(hospital - 1) % len(CLINICAL_LABELS)]


def _note(rng: random.Random, label: str) -> str:
    """One note: mostly its specialty's vocabulary, sometimes ambiguous on purpose."""
    own = _SPECIALTY[label]
    complaint = rng.choice(own["complaint"])
    roll = rng.random()
    if roll < 0.12:
        # Findings and plan of another specialty: a genuinely mixed picture.
        source = _SPECIALTY[rng.choice([c for c in CLINICAL_LABELS if c != label])]
    elif roll < 0.20:
        # Only generic findings and plan: a vague presentation.
        source = _SHARED
    else:
        source = own
    if rng.random() < 0.5:
        complaint = f"{complaint} and {rng.choice(_SHARED['complaint'])}"
    if rng.random() < 0.5:
        history = (rng.choice(own["history"]), rng.choice(_SHARED["history"]))
    else:
        history = tuple(rng.sample(_SHARED["history"], 2))
    return " ".join(
        (
            f"{rng.randint(18, 92)}{rng.choice('MF')} presenting with {complaint} "
            f"for {rng.choice(_DURATIONS)}.",
            f"PMH: {', '.join(history)}.",
            f"O/E {rng.choice(source['finding'])}; {rng.choice(_SHARED['finding'])}.",
            _vitals(rng),
            f"Plan: {rng.choice(source['plan'])}, {rng.choice(_SHARED['plan'])}.",
        )
    )


def _vitals(rng: random.Random) -> str:
    """Three of four routine observations, as notes rarely record all of them."""
    observations = [
        f"BP {rng.randint(100, 170)}/{rng.randint(60, 100)}",
        f"HR {rng.randint(55, 120)}",
        f"SpO2 {rng.randint(91, 100)}%",
        f"T {rng.uniform(36.2, 38.9):.1f}",
    ]
    del observations[rng.randrange(len(observations))]
    return ", ".join(observations) + "."

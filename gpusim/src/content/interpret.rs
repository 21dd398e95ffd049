//! Interpretations: keyword rules in Spanish and English decide the intent of
//! a message (case- and accent-insensitive, whole words), and the work title
//! is taken from the message itself.

use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    OpenWork,
    UpdateWork,
    Confirm,
    Cancel,
    Chat,
}

impl Intent {
    pub fn as_str(self) -> &'static str {
        match self {
            Intent::OpenWork => "open_work",
            Intent::UpdateWork => "update_work",
            Intent::Confirm => "confirm",
            Intent::Cancel => "cancel",
            Intent::Chat => "chat",
        }
    }
}

// Keywords are written folded (lower case, no accents): "cancelá" is "cancela".
const CANCEL: &[&str] =
    &["cancel", "cancela", "cancelar", "anula", "anular", "olvidalo", "never mind", "nevermind", "abort"];
const CONFIRM: &[&str] = &[
    "confirmo",
    "confirmar",
    "confirma",
    "confirm",
    "confirmed",
    "si",
    "yes",
    "correcto",
    "dale",
    "de acuerdo",
    "ok",
    "okay",
    "go ahead",
    "afirmativo",
];
const UPDATE: &[&str] = &[
    "actualiza",
    "actualizar",
    "modifica",
    "modificar",
    "agrega al trabajo",
    "anade al trabajo",
    "update",
    "change the status",
    "cambia el estado",
    "mark as",
    "marca como",
    "reprograma",
    "reschedule",
];
const OPEN: &[&str] = &[
    "abri",
    "abre",
    "abrir",
    "crea",
    "crear",
    "nuevo trabajo",
    "nueva orden",
    "orden de trabajo",
    "open a",
    "open",
    "create",
    "new work order",
    "work order",
    "schedule a",
    "programa un",
];
/// Courtesies before the request; a keyword right after them still counts as "at the start".
const FILLERS: &[&str] = &[
    "please",
    "pls",
    "hi",
    "hello",
    "hey",
    "hola",
    "buenas",
    "buen dia",
    "buenos dias",
    "por favor",
    "porfa",
];
const ARTICLES: &[&str] = &["la", "el", "los", "las", "un", "una", "the", "a", "an"];
const SEPARATOR_WORDS: &[&str] = &["para", "to", "for"];
const SPANISH_WORDS: &[&str] =
    &["el", "la", "los", "las", "que", "por", "de", "del", "un", "una", "hola", "gracias", "trabajo"];
const MAX_TITLE_CHARS: usize = 80;
const MAX_SUMMARY_CHARS: usize = 200;

/// A word of the message: its folded form and where it sits in the original,
/// so titles can be cut from the original text, accents and case intact.
#[derive(Debug)]
struct Word<'a> {
    folded: String,
    raw: &'a str,
    end: usize,
    start: usize,
}

fn fold(c: char) -> char {
    match c {
        'á' | 'à' | 'ä' | 'â' | 'ã' => 'a',
        'é' | 'è' | 'ë' | 'ê' => 'e',
        'í' | 'ì' | 'ï' | 'î' => 'i',
        'ó' | 'ò' | 'ö' | 'ô' | 'õ' => 'o',
        'ú' | 'ù' | 'ü' | 'û' => 'u',
        'ñ' => 'n',
        'ç' => 'c',
        c => c,
    }
}

/// Runs of alphanumeric characters, lower-cased and accent-folded.
fn words(message: &str) -> Vec<Word<'_>> {
    let mut out = Vec::new();
    let mut start = None;
    let mut folded = String::new();
    for (i, c) in message.char_indices().chain(std::iter::once((message.len(), ' '))) {
        if c.is_alphanumeric() {
            start.get_or_insert(i);
            folded.extend(c.to_lowercase().filter(|l| l.is_alphanumeric()).map(fold));
        } else if let Some(s) = start.take() {
            out.push(Word { folded: std::mem::take(&mut folded), raw: &message[s..i], start: s, end: i });
        }
    }
    out
}

/// Where a keyword phrase was found: words `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hit {
    start: usize,
    end: usize,
}

fn phrase_at(words: &[Word<'_>], at: usize, phrase: &str) -> Option<Hit> {
    let mut end = at;
    for part in phrase.split(' ') {
        let w = words.get(end)?;
        if w.folded != part {
            return None;
        }
        end += 1;
    }
    // Unaccented "si" inside a sentence is "if", not "yes".
    if phrase == "si" && at > 0 && !words[at].raw.contains(['í', 'Í']) {
        return None;
    }
    Some(Hit { start: at, end })
}

/// The earliest keyword of `list` in the message, the longest one at that spot.
fn find(words: &[Word<'_>], list: &[&str]) -> Option<Hit> {
    (0..words.len()).find_map(|at| list.iter().filter_map(|p| phrase_at(words, at, p)).max_by_key(|h| h.end))
}

/// The first word after any courtesies.
fn lead(words: &[Word<'_>]) -> usize {
    let mut at = 0;
    while let Some(h) = FILLERS.iter().find_map(|p| phrase_at(words, at, p)) {
        at = h.end;
    }
    at
}

/// Is the character after byte `end` (spaces skipped) punctuation, or the end of the message?
fn punctuation_after(message: &str, end: usize) -> bool {
    message[end..].trim_start().chars().next().is_none_or(|c| !c.is_alphanumeric())
}

/// The intent of a message and the confidence to report.
///
/// Rules are checked in the order cancel, confirm, update, open, with two
/// refinements so work descriptions are not misread: a cancel or confirm word
/// that comes after the work keyword is part of the description ("abrí un
/// trabajo para cancelar el abono"), and a leading unaccented "si" followed by
/// a work request is "if" ("si podés, abrí…" still opens work). Between update
/// and open, the earlier keyword wins ("create a work order to update the firmware").
pub fn classify(message: &str) -> (Intent, f64) {
    let ws = words(message);
    classify_words(message, &ws).map(|(i, h)| (i, confidence(&ws, h))).unwrap_or((Intent::Chat, 0.6))
}

fn confidence(ws: &[Word<'_>], hit: Hit) -> f64 {
    if hit.start <= lead(ws) { 0.92 } else { 0.75 }
}

fn classify_words(message: &str, ws: &[Word<'_>]) -> Option<(Intent, Hit)> {
    let update = find(ws, UPDATE);
    let open = find(ws, OPEN);
    let work = match (update, open) {
        (Some(u), Some(o)) if o.start < u.start => Some((Intent::OpenWork, o)),
        (Some(u), _) => Some((Intent::UpdateWork, u)),
        (None, Some(o)) => Some((Intent::OpenWork, o)),
        (None, None) => None,
    };
    let before_work = |h: Hit| work.is_none_or(|(_, w)| h.start < w.start);

    if let Some(c) = find(ws, CANCEL).filter(|&c| before_work(c)) {
        return Some((Intent::Cancel, c));
    }
    if let Some(c) = find(ws, CONFIRM).filter(|&c| before_work(c)) {
        let at_start = c.start == lead(ws);
        let if_clause = ws[c.start].folded == "si"
            && !ws[c.start].raw.contains(['í', 'Í'])
            && work.is_some()
            && !punctuation_after(message, ws[c.end - 1].end);
        let short = ws.len() <= 8 && work.is_none();
        if (at_start && !if_clause) || short {
            return Some((Intent::Confirm, c));
        }
    }
    work
}

/// The work title: the text after the first "para"/"to"/"for"/": " that
/// follows the keyword (else the text after the keyword), articles dropped,
/// first sentence only, capitalised, at most 80 characters cut at a word.
pub fn title(message: &str) -> String {
    let ws = words(message);
    let after_keyword = match classify_words(message, &ws) {
        Some((Intent::OpenWork | Intent::UpdateWork, hit)) => ws[hit.end - 1].end,
        _ => 0,
    };
    title_after(message, &ws, after_keyword)
}

fn title_after(message: &str, ws: &[Word<'_>], from: usize) -> String {
    let by_word = ws.iter().find(|w| w.start >= from && SEPARATOR_WORDS.contains(&w.folded.as_str()));
    let by_colon = message[from..]
        .char_indices()
        .find(|&(i, c)| c == ':' && message[from + i + 1..].chars().next().is_none_or(char::is_whitespace))
        .map(|(i, _)| from + i);
    let cut = match (by_word, by_colon) {
        (Some(w), Some(c)) if c < w.start => c + 1,
        (Some(w), _) => w.end,
        (None, Some(c)) => c + 1,
        (None, None) => from,
    };
    [cut, from, 0]
        .into_iter()
        .map(|at| clean_title(&message[at..]))
        .find(|t| !t.is_empty())
        .unwrap_or_else(|| if spanish(message) { "Trabajo" } else { "Work order" }.to_string())
}

fn is_article(word: &str) -> bool {
    let w = word.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase();
    ARTICLES.contains(&w.as_str())
}

fn clean_title(text: &str) -> String {
    // First sentence only: a stop followed by a space or the end ("3.5" is not a stop).
    let mut end = text.len();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let next_is_space = chars.peek().is_none_or(|&(_, n)| n.is_whitespace());
        if c == '\n' || (".!?;".contains(c) && next_is_space) {
            end = i;
            break;
        }
    }
    let text = text[..end].trim_matches(|c: char| !c.is_alphanumeric());
    let mut ws: Vec<&str> = text.split_whitespace().collect();
    while ws.first().is_some_and(|w| is_article(w)) {
        ws.remove(0);
    }
    while ws.len() > 2 && is_article(ws[1]) {
        ws.remove(1);
    }
    let mut t = String::new();
    for w in ws {
        let needed = t.chars().count() + usize::from(!t.is_empty()) + w.chars().count();
        if needed > MAX_TITLE_CHARS {
            if t.is_empty() {
                t = w.chars().take(MAX_TITLE_CHARS).collect();
            }
            break;
        }
        if !t.is_empty() {
            t.push(' ');
        }
        t.push_str(w);
    }
    let t = t.trim_end_matches(|c: char| !c.is_alphanumeric());
    let mut cs = t.chars();
    cs.next().map(|first| first.to_uppercase().chain(cs).collect()).unwrap_or_default()
}

/// Spanish if it has Spanish letters or common Spanish words; English otherwise.
pub fn spanish(message: &str) -> bool {
    message.chars().any(|c| "ñáéíóúÑÁÉÍÓÚ¿¡".contains(c))
        || words(message).iter().any(|w| SPANISH_WORDS.contains(&w.folded.as_str()))
}

fn chat_reply(message: &str) -> &'static str {
    let ws = words(message);
    let has = |list: &[&str]| ws.iter().any(|w| list.contains(&w.folded.as_str()));
    let es = spanish(message);
    if has(&["gracias", "thanks", "thank", "thx"]) {
        if es { "De nada. ¿Algo más en lo que pueda ayudarte?" } else { "You're welcome. Anything else?" }
    } else if has(&["hola", "buenas", "hi", "hello", "hey"]) {
        if es { "¡Hola! ¿En qué puedo ayudarte hoy?" } else { "Hi! How can I help you today?" }
    } else if message.contains('?') {
        if es {
            "Puedo ayudarte a abrir o actualizar trabajos. ¿Querés que abra uno?"
        } else {
            "I can help you open or update work orders. Shall I open one?"
        }
    } else if es {
        "Entendido. ¿En qué más puedo ayudarte?"
    } else {
        "Understood. How else can I help?"
    }
}

/// The model's answer to an interpretation request.
pub fn answer(message: &str) -> Value {
    let ws = words(message);
    let classified = classify_words(message, &ws);
    let (intent, confidence) =
        classified.map(|(i, h)| (i, confidence(&ws, h))).unwrap_or((Intent::Chat, 0.6));
    let work = match classified {
        Some((Intent::OpenWork | Intent::UpdateWork, hit)) => {
            let summary: String = message.trim().chars().take(MAX_SUMMARY_CHARS).collect();
            json!({"title": title_after(message, &ws, ws[hit.end - 1].end), "summary": summary.trim_end()})
        }
        _ => Value::Null,
    };
    let reply = if intent == Intent::Chat { json!(chat_reply(message)) } else { Value::Null };
    json!({
        "intent": intent.as_str(),
        "confidence": confidence,
        "work": work,
        "reply": reply,
        "degraded": false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_example() {
        let a = answer("Abrí un trabajo para cambiar la bomba del pozo 3");
        assert_eq!(a["intent"], "open_work");
        assert_eq!(a["confidence"], 0.92);
        assert_eq!(a["work"]["title"], "Cambiar bomba del pozo 3");
        assert_eq!(a["work"]["summary"], "Abrí un trabajo para cambiar la bomba del pozo 3");
        assert_eq!(a["reply"], Value::Null);
        assert_eq!(a["degraded"], false);
        let keys: Vec<&String> = a.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 5);
    }

    #[test]
    fn intents_in_both_languages() {
        let cases = [
            ("Abrí un trabajo para cambiar la bomba del pozo 3", Intent::OpenWork),
            ("Please open a work order to replace the valve on line 4", Intent::OpenWork),
            ("Creá una orden de trabajo para pintar el galpón", Intent::OpenWork),
            ("We need a new work order for the generator", Intent::OpenWork),
            ("Create a work order to update the firmware on site 9", Intent::OpenWork),
            ("Si podés abrí un trabajo para revisar el tablero", Intent::OpenWork),
            ("Abrí un trabajo para cancelar el abono de agua", Intent::OpenWork),
            ("Actualiza el trabajo 12: ya llegó el repuesto", Intent::UpdateWork),
            ("Update work order 7: technician assigned", Intent::UpdateWork),
            ("Marcá como terminado el trabajo del pozo 3", Intent::UpdateWork),
            ("Please change the status of job 12 to done", Intent::UpdateWork),
            ("Reprograma la visita para el jueves", Intent::UpdateWork),
            ("Sí, confirmo", Intent::Confirm),
            ("yes go ahead", Intent::Confirm),
            ("OK", Intent::Confirm),
            ("De acuerdo, dale nomás", Intent::Confirm),
            ("Sí, abrí el trabajo", Intent::Confirm),
            ("Cancelá el pedido", Intent::Cancel),
            ("never mind, cancel it", Intent::Cancel),
            ("Olvídalo, no hace falta", Intent::Cancel),
            ("¿Qué tiempo hace en Mendoza?", Intent::Chat),
            ("no sé si va a llover mañana", Intent::Chat),
            ("thanks for your help yesterday", Intent::Chat),
            ("", Intent::Chat),
        ];
        for (msg, want) in cases {
            assert_eq!(classify(msg).0, want, "{msg}");
        }
    }

    #[test]
    fn confidence_reflects_where_the_keyword_is() {
        assert_eq!(classify("Open a work order for pump 3").1, 0.92);
        assert_eq!(classify("Hola, por favor abrí un trabajo para la bomba").1, 0.92);
        assert_eq!(classify("We need a new work order for the generator").1, 0.75);
        assert_eq!(classify("hello there").1, 0.6);
    }

    #[test]
    fn titles() {
        assert_eq!(
            title("Please open a work order to replace the valve on line 4"),
            "Replace valve on line 4"
        );
        assert_eq!(title("Actualiza el trabajo 12: ya llegó el repuesto"), "Ya llegó el repuesto");
        assert_eq!(title("Creá una orden de trabajo para pintar el galpón."), "Pintar galpón");
        assert_eq!(title("Create pump inspection at site 4"), "Pump inspection at site 4");
        assert_eq!(title("Abrí un trabajo para la bomba 3.5. Es urgente!"), "Bomba 3.5");
        assert_eq!(title("Open a work order at 12:30 for the main gate"), "Main gate");
        assert_eq!(title("open"), "Open");
        let long = format!("Open a work order for {}", "replacement ".repeat(20));
        let t = title(&long);
        assert!(t.chars().count() <= 80 && t.ends_with("replacement"), "{t}");
        let one_huge_word = format!("Open a work order for {}", "x".repeat(200));
        assert_eq!(title(&one_huge_word).chars().count(), 80);
    }

    #[test]
    fn replies_follow_the_language() {
        assert_eq!(answer("Hola, ¿cómo estás?")["reply"], "¡Hola! ¿En qué puedo ayudarte hoy?");
        assert_eq!(answer("thanks a lot")["reply"], "You're welcome. Anything else?");
        assert_eq!(answer("Sí, confirmo")["reply"], Value::Null);
        assert_eq!(answer("Sí, confirmo")["work"], Value::Null);
        assert!(spanish("que hacemos con la bomba"));
        assert!(!spanish("what about the pump"));
    }

    #[test]
    fn odd_text_never_panics() {
        for m in
            ["İstanbul open a work order for İzmir", "🙂🙂 abrí 🙂 para 🙂", ":", "para", "to:", "\u{0}\n\t"]
        {
            let a = answer(m);
            assert!(a["intent"].is_string());
            if !a["work"].is_null() {
                assert!(!a["work"]["title"].as_str().unwrap().is_empty());
            }
        }
    }
}

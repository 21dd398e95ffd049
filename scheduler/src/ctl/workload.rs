//! The demo's workload: realistic operator messages in Spanish and English
//! covering every intent, and one deliberation per default council (pure).

use serde_json::{Value, json};

use flota_shared::envelope::Intent;

// `{n}` becomes a number, `{place}` a place, so messages differ from one another.
const OPEN: &[&str] = &[
    "Abrí un trabajo para cambiar la bomba del pozo {n}",
    "Please open a work order to replace the valve on line {n}",
    "Creá una orden de trabajo para pintar el galpón {n} de {place}",
    "Open a work order for the broken conveyor belt in bay {n}",
    "Necesito abrir un trabajo para revisar el tablero eléctrico del sector {n}",
    "Create a work order to inspect the generator at the {place} site",
    "Abre una orden de trabajo para reparar la cerca del lote {n}",
    "Please create a new work order to calibrate sensor {n} in {place}",
    "Hay una pérdida de aceite en el compresor {n} de {place}, abrí un trabajo",
    "The air conditioning in room {n} at {place} is broken, open a ticket to fix it",
];
const UPDATE: &[&str] = &[
    "Actualiza el trabajo {n}: ya llegó el repuesto",
    "Update work order {n}: technician assigned",
    "Modifica el trabajo {n}, cambia la fecha al lunes",
    "Update the work order {n} and mark it as waiting for parts",
    "Reprograma el trabajo {n} para la semana que viene",
    "Reschedule work order {n} to Friday morning",
    "En el trabajo {n} agregá que el técnico de {place} ya pasó",
    "Add a note to work order {n}: the crew from {place} is on site",
];
const CONFIRM: &[&str] = &[
    "Sí, confirmo",
    "yes go ahead",
    "Dale, confirmo el trabajo {n}",
    "Confirmed, thanks",
    "De acuerdo, avanzá con la orden {n}",
    "ok, go ahead with {n}",
    "Perfecto, confirmado",
];
const CANCEL: &[&str] = &[
    "Cancelá el pedido {n}",
    "never mind, cancel it",
    "Anula la orden {n} por favor",
    "Please cancel work order {n}",
    "Olvídalo, no hace falta",
    "Cancel the inspection in {place}, it is no longer needed",
    "Dejá sin efecto el trabajo {n}",
];
const CHAT: &[&str] = &[
    "¿Qué tiempo hace en {place} hoy?",
    "thanks for your help yesterday",
    "¿Quién está de guardia este fin de semana en {place}?",
    "How many technicians are on shift {n}?",
    "Buenos días, ¿cómo va todo?",
    "What does error code E{n} mean on the pump panel?",
    "Gracias por la ayuda con el pozo {n}",
    "Is the {place} warehouse open on Sundays?",
];
const PLACES: &[&str] = &[
    "Mendoza",
    "San Juan",
    "Neuquén",
    "Córdoba",
    "Rosario",
    "Salta",
    "Bahía Blanca",
    "Houston",
    "Calgary",
    "Aberdeen",
];

/// Every template, by the intent it asks for.
pub const TEMPLATES: [(Intent, &[&str]); 5] = [
    (Intent::OpenWork, OPEN),
    (Intent::UpdateWork, UPDATE),
    (Intent::Confirm, CONFIRM),
    (Intent::Cancel, CANCEL),
    (Intent::Chat, CHAT),
];

/// One deliberation per default council: (role, task).
pub const DELIBERATIONS: [(&str, &str); 5] = [
    ("DEV", "Add retries with exponential backoff and jitter to the nightly billing export job"),
    ("QA", "Plan the regression suite for the new work-order approval flow before Friday's release"),
    ("ARCHITECT", "Split the monolith's notification module into its own service without downtime"),
    ("DEVOPS", "Move the staging cluster to spot instances while keeping 99.5% uptime"),
    ("DATA", "Deduplicate customer records across the CRM and billing databases"),
];

/// `n` interpretation messages with the intent each was written for.
/// Open work is the common case (40%), then update and chat (20% each),
/// confirm and cancel (10% each); numbers and places vary per message.
pub fn interpretations(n: usize) -> Vec<(Intent, String)> {
    (0..n)
        .map(|i| {
            let (intent, group) = match i % 10 {
                0..=3 => TEMPLATES[0],
                4 | 5 => TEMPLATES[1],
                6 => TEMPLATES[2],
                7 => TEMPLATES[3],
                _ => TEMPLATES[4],
            };
            let template = group[(i / 10 + i % 10) % group.len()];
            let number = (i * 7) % 97 + 1;
            let place = PLACES[(i * 3 + i / 7) % PLACES.len()];
            (intent, template.replace("{n}", &number.to_string()).replace("{place}", place))
        })
        .collect()
}

/// The demo's task envelopes: `n` interpretations, then the deliberations;
/// ids `demo:0`, `demo:1`, … Returns the envelopes and the deliberations' (id, role).
pub fn tasks(n: usize) -> (Vec<Value>, Vec<(String, &'static str)>) {
    let mut tasks: Vec<Value> = interpretations(n)
        .into_iter()
        .enumerate()
        .map(|(i, (_, message))| {
            json!({"id": format!("demo:{i}"), "kind": "interpret",
                   "input": {"message": message, "conversation_id": format!("demo-conv-{}", i % 50)},
                   "meta": {"source": "demo"}})
        })
        .collect();
    let mut deliberations = Vec::new();
    for (j, (role, task)) in DELIBERATIONS.iter().enumerate() {
        let id = format!("demo:{}", n + j);
        tasks.push(json!({"id": id, "kind": "deliberate",
                          "input": {"role": role, "task": task, "agents": 3},
                          "meta": {"source": "demo"}}));
        deliberations.push((id, *role));
    }
    (tasks, deliberations)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn there_are_about_forty_templates() {
        let n: usize = TEMPLATES.iter().map(|(_, t)| t.len()).sum();
        assert!(n >= 40, "{n}");
    }

    #[test]
    fn messages_are_varied_bilingual_and_cover_every_intent() {
        let msgs = interpretations(2000);
        let distinct: HashSet<&str> = msgs.iter().map(|(_, m)| m.as_str()).collect();
        assert!(distinct.len() > 500, "only {} distinct messages", distinct.len());
        let spanish = msgs.iter().filter(|(_, m)| m.contains("trabajo") || m.contains("¿")).count();
        let english = msgs.iter().filter(|(_, m)| m.contains("work order") || m.contains("go ahead")).count();
        assert!(spanish > 200 && english > 200, "es {spanish}, en {english}");
        for (intent, _) in TEMPLATES {
            let share = msgs.iter().filter(|(i, _)| *i == intent).count();
            assert!(share >= 200, "{intent:?}: {share}");
        }
        assert!(msgs.iter().all(|(_, m)| !m.contains('{')), "a placeholder was left");
    }

    #[test]
    fn tasks_are_valid_envelopes_with_demo_ids() {
        let (tasks, deliberations) = tasks(20);
        assert_eq!(tasks.len(), 25);
        assert_eq!(deliberations.len(), 5);
        assert_eq!(deliberations[0].0, "demo:20");
        for t in tasks {
            let id = t["id"].as_str().unwrap_or_default().to_string();
            assert!(id.starts_with("demo:"));
            flota_shared::envelope::validate_value(t).unwrap_or_else(|r| panic!("{id}: {r}"));
        }
    }
}

//! `datawarp-gen`: a deterministic generator of realistic monthly statistics in the style of NHS
//! England's publications, used as the sample source data of the DataWarp pipeline.
//!
//! Three datasets, one CSV per month each:
//! - `ae_attendances`: A&E attendances and emergency admissions by provider and department type;
//! - `rtt_waiting_times`: referral-to-treatment waiting lists by provider and treatment function;
//! - `gp_appointments`: appointments in general practice by sub-ICB location, mode, staff type
//!   and time from booking.
//!
//! The organisations, and which rows exist, depend only on the dataset; the numbers of a month
//! depend only on the dataset, the month and the row count. Nothing reads the clock or the OS
//! random source, so the same arguments always give byte-identical files. The random generator
//! is SplitMix64, written out here rather than taken from a crate, so that a dependency upgrade
//! can never change the committed data.

use std::collections::HashSet;
use std::f64::consts::PI;
use std::path::{Path, PathBuf};

use crate::error::{Result, ToolError};

/// The datasets the generator writes.
pub const DATASETS: [&str; 3] = ["ae_attendances", "rtt_waiting_times", "gp_appointments"];
/// Default first month.
pub const DEFAULT_FROM: &str = "2023-01";
/// Default last month.
pub const DEFAULT_TO: &str = "2024-12";
/// Default data rows per file; 1750 keeps the 72 committed files together under 12 MB.
pub const DEFAULT_ROWS: usize = 1750;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateArgs {
    /// Root directory; files go to `<out_dir>/<dataset>/<YYYY-MM>.csv`.
    pub out_dir: PathBuf,
    /// First and last month, inclusive, as `(year, month)`.
    pub months: ((i32, u32), (i32, u32)),
    /// Data rows per file.
    pub rows: usize,
}

/// Parses `FROM..TO` (`2023-01..2024-12`) into an inclusive month range.
pub fn parse_months(text: &str) -> Result<((i32, u32), (i32, u32))> {
    let bad = || {
        ToolError::permanent(format!(
            "months `{text}` is not a range; expected FROM..TO as in 2023-01..2024-12"
        ))
    };
    let (from, to) = text.split_once("..").ok_or_else(bad)?;
    let parse = |month: &str| {
        crate::manifest::validate_month(month).ok()?;
        Some((month[..4].parse().ok()?, month[5..].parse().ok()?))
    };
    let range = (parse(from).ok_or_else(bad)?, parse(to).ok_or_else(bad)?);
    if range.0 > range.1 {
        return Err(ToolError::permanent(format!(
            "months `{text}` ends before it starts"
        )));
    }
    Ok(range)
}

/// The months of an inclusive range, in order.
pub fn months_in(range: ((i32, u32), (i32, u32))) -> Vec<(i32, u32)> {
    let mut months = Vec::new();
    let (mut year, mut month) = range.0;
    while (year, month) <= range.1 {
        months.push((year, month));
        (year, month) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
    }
    months
}

/// Writes every dataset for every month; returns the summary line.
pub fn run(args: &GenerateArgs) -> Result<String> {
    if args.rows == 0 {
        return Err(ToolError::permanent("rows must be at least 1"));
    }
    let months = months_in(args.months);
    let mut files = 0;
    let mut bytes = 0;
    for dataset in DATASETS {
        for &(year, month) in &months {
            let csv = generate(dataset, year, month, args.rows);
            let path = month_path(&args.out_dir, dataset, year, month);
            crate::atomic::write(&path, csv.as_bytes())?;
            files += 1;
            bytes += csv.len();
        }
    }
    Ok(format!(
        "Wrote {files} files ({bytes} bytes) under {}",
        args.out_dir.display()
    ))
}

/// Where the file of one dataset and month goes.
pub fn month_path(root: &Path, dataset: &str, year: i32, month: u32) -> PathBuf {
    root.join(dataset).join(format!("{year:04}-{month:02}.csv"))
}

/// The CSV text of one dataset for one month.
pub fn generate(dataset: &str, year: i32, month: u32, rows: usize) -> String {
    let period = Period::new(year, month);
    match dataset {
        "ae_attendances" => ae_attendances(&period, rows),
        "rtt_waiting_times" => rtt_waiting_times(&period, rows),
        "gp_appointments" => gp_appointments(&period, rows),
        other => panic!("unknown dataset `{other}`; expected one of {DATASETS:?}"),
    }
}

/// The header of each dataset, in column order (used by the reference-coverage test).
pub fn header(dataset: &str) -> &'static [&'static str] {
    match dataset {
        "ae_attendances" => &AE_HEADER,
        "rtt_waiting_times" => &RTT_HEADER,
        "gp_appointments" => &GP_HEADER,
        other => panic!("unknown dataset `{other}`; expected one of {DATASETS:?}"),
    }
}

const AE_HEADER: [&str; 10] = [
    "org_code",
    "org_name",
    "region",
    "department_type",
    "attendances",
    "within_4h",
    "over_4h",
    "emergency_admissions",
    "pct_within_4h",
    "period",
];

const RTT_HEADER: [&str; 11] = [
    "period",
    "provider_code",
    "provider_name",
    "treatment_function_code",
    "treatment_function",
    "total_waiting",
    "within_18_weeks",
    "over_52_weeks",
    "pct_within_18_weeks",
    "median_wait_weeks",
    "p92_wait_weeks",
];

const GP_HEADER: [&str; 10] = [
    "period",
    "icb_code",
    "icb_name",
    "sub_icb_code",
    "appointment_mode",
    "hcp_type",
    "time_between_booking_and_appointment",
    "count_of_appointments",
    "dna_count",
    "pct_attended",
];

/// SplitMix64: small, fast, and fully specified, so its output never changes.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(parts: &[&str]) -> Self {
        // FNV-1a over the parts, separated so that ("ab", "c") and ("a", "bc") differ.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for part in parts {
            for byte in part.bytes().chain([0xff]) {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        Self(hash)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform index below `n`.
    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (2.0 * PI * v).cos()
    }

    /// Log-normal around `median` with spread `sigma`.
    fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }
}

/// The month being generated and its seasonal position.
struct Period {
    year: i32,
    month: u32,
    /// Months since January 2023 (may be negative), for trends.
    index: f64,
    label: String,
    date: String,
}

impl Period {
    fn new(year: i32, month: u32) -> Self {
        Self {
            year,
            month,
            index: f64::from((year - 2023) * 12) + f64::from(month) - 1.0,
            label: format!("{year:04}-{month:02}"),
            date: format!("{year:04}-{month:02}-01"),
        }
    }

    /// +1 in January, −1 in July: winter pressure.
    fn winter(&self) -> f64 {
        (2.0 * PI * f64::from(self.month - 1) / 12.0).cos()
    }

    /// Days in the month, for volumes.
    fn days(&self) -> f64 {
        let next = if self.month == 12 {
            (self.year + 1, 1)
        } else {
            (self.year, self.month + 1)
        };
        let first = chrono::NaiveDate::from_ymd_opt(self.year, self.month, 1).expect("valid month");
        let after = chrono::NaiveDate::from_ymd_opt(next.0, next.1, 1).expect("valid month");
        (after - first).num_days() as f64
    }

    fn rng(&self, dataset: &str, rows: usize) -> Rng {
        Rng::new(&[dataset, &self.label, &rows.to_string()])
    }
}

const PLACES: [&str; 64] = [
    "Airedale",
    "Barnsley",
    "Bedford",
    "Blackpool",
    "Bolton",
    "Bradford",
    "Brighton",
    "Bristol",
    "Burton",
    "Calderdale",
    "Cambridge",
    "Carlisle",
    "Chelsea",
    "Chesterfield",
    "Colchester",
    "Coventry",
    "Croydon",
    "Darlington",
    "Derby",
    "Doncaster",
    "Dorset",
    "Dudley",
    "Ealing",
    "Exeter",
    "Frimley",
    "Gateshead",
    "Gloucester",
    "Grimsby",
    "Harrogate",
    "Hereford",
    "Hillingdon",
    "Hull",
    "Ipswich",
    "Kettering",
    "Kingston",
    "Lancaster",
    "Leeds",
    "Leicester",
    "Lewisham",
    "Lincoln",
    "Luton",
    "Medway",
    "Milton Keynes",
    "Newham",
    "Norfolk",
    "Northampton",
    "Northumbria",
    "Nottingham",
    "Oxford",
    "Plymouth",
    "Portsmouth",
    "Preston",
    "Reading",
    "Rotherham",
    "Salford",
    "Sheffield",
    "Southend",
    "Stockport",
    "Sunderland",
    "Swindon",
    "Torbay",
    "Walsall",
    "Wigan",
    "York",
];

const REGIONS: [&str; 7] = [
    "East of England",
    "London",
    "Midlands",
    "North East and Yorkshire",
    "North West",
    "South East",
    "South West",
];

const ALNUM: &[u8] = b"ABCDEFGHJKLMNPQRTVWXY0123456789";

/// An organisation: code, name and region.
#[derive(Debug, Clone)]
struct Org {
    code: String,
    name: String,
    region: &'static str,
}

/// A stable list of organisations for one kind (`trust`, `site`, `icb`), unique by code and name.
fn orgs(kind: &str, count: usize) -> Vec<Org> {
    let mut rng = Rng::new(&["orgs", kind]);
    let mut codes = HashSet::new();
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let first = *rng.pick(&PLACES);
        let second = *rng.pick(&PLACES);
        let (code, name) = match kind {
            "trust" => {
                let code = format!("R{}{}", *rng.pick(ALNUM) as char, *rng.pick(ALNUM) as char);
                let name = match rng.below(5) {
                    0 => format!("{first} and {second} NHS FT"),
                    1 => format!("{first} Teaching Hospitals NHS FT"),
                    2 => format!("{first} University Hospitals NHS FT"),
                    3 => format!("{first} Hospitals NHS Trust"),
                    _ => format!("{first} and {second} NHS Trust"),
                };
                (code, name)
            }
            "site" => {
                let letter = *rng.pick(b"ADFNY") as char;
                let code = format!(
                    "{letter}{}{}",
                    *rng.pick(ALNUM) as char,
                    *rng.pick(ALNUM) as char
                );
                let name = match rng.below(4) {
                    0 => format!("{first} Urgent Treatment Centre"),
                    1 => format!(
                        "{first} {} UTC",
                        rng.pick(&["North", "South", "East", "West", "Central"])
                    ),
                    2 => format!("{first} Walk-in Centre"),
                    _ => format!("{first} and {second} Minor Injuries Unit"),
                };
                (code, name)
            }
            _ => {
                let code = format!(
                    "Q{}{}",
                    *rng.pick(b"ABCDEFGHJKMNOPRSTUVWXY") as char,
                    *rng.pick(ALNUM) as char
                );
                let name = if rng.chance(0.5) {
                    format!("NHS {first} and {second} ICB")
                } else {
                    format!("NHS {first} ICB")
                };
                (code, name)
            }
        };
        if first == second || codes.contains(&code) || names.contains(&name) {
            continue;
        }
        codes.insert(code.clone());
        names.insert(name.clone());
        out.push(Org {
            code,
            name,
            region: REGIONS[rng.below(REGIONS.len())],
        });
    }
    out
}

/// Picks `n` of `total` indices in increasing order (selection sampling, Knuth's Algorithm S).
fn select(rng: &mut Rng, total: usize, n: usize) -> Vec<usize> {
    let mut chosen = Vec::with_capacity(n.min(total));
    for index in 0..total {
        let needed = n.min(total) - chosen.len();
        if needed == 0 {
            break;
        }
        if rng.below(total - index) < needed {
            chosen.push(index);
        }
    }
    chosen
}

/// Leaves a cell empty with a small probability, as real publications occasionally do.
fn maybe(rng: &mut Rng, p: f64, text: String) -> String {
    if rng.chance(p) { String::new() } else { text }
}

fn csv_line(out: &mut String, cells: &[&str]) {
    for (index, cell) in cells.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        if cell.contains([',', '"', '\n']) {
            out.push('"');
            out.push_str(&cell.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(cell);
        }
    }
    out.push('\n');
}

/// A&E: one row per provider and department type.
fn ae_attendances(period: &Period, rows: usize) -> String {
    // Keys: trusts have a type 1 department and often type 2 or 3; other sites are type 3 only.
    let trusts = orgs("trust", 400);
    let sites = orgs("site", 2000);
    let mut key_rng = Rng::new(&["keys", "ae_attendances"]);
    let mut keys: Vec<(&Org, &str, f64, f64)> = Vec::new();
    let (mut t, mut s) = (0, 0);
    while keys.len() < rows && (t < trusts.len() || s < sites.len()) {
        if t < trusts.len() && (key_rng.chance(0.15) || s == sites.len()) {
            let trust = &trusts[t];
            t += 1;
            keys.push((
                trust,
                "Type 1",
                key_rng.lognormal(9000.0, 0.45),
                key_rng.uniform(0.55, 0.82),
            ));
            if key_rng.chance(0.15) {
                keys.push((
                    trust,
                    "Type 2",
                    key_rng.lognormal(900.0, 0.6),
                    key_rng.uniform(0.85, 0.99),
                ));
            }
            if key_rng.chance(0.6) {
                keys.push((
                    trust,
                    "Type 3",
                    key_rng.lognormal(3500.0, 0.6),
                    key_rng.uniform(0.93, 0.995),
                ));
            }
        } else {
            let site = &sites[s];
            s += 1;
            keys.push((
                site,
                "Type 3",
                key_rng.lognormal(2200.0, 0.7),
                key_rng.uniform(0.94, 0.999),
            ));
        }
    }
    keys.truncate(rows);
    // Publications list providers in code order.
    keys.sort_by(|a, b| (&a.0.code, a.1).cmp(&(&b.0.code, b.1)));
    let mut rng = period.rng("ae_attendances", rows);
    let mut out = String::with_capacity(rows * 100);
    csv_line(&mut out, &AE_HEADER);
    let summer = -period.winter();
    for (org, department, base, performance) in keys {
        let volume =
            base * period.days() / 30.4 * (1.0 + 0.05 * summer) * (1.0 + 0.004 * period.index);
        let attendances = (volume * (1.0 + 0.04 * rng.normal())).round().max(0.0) as i64;
        let pressure = if department == "Type 1" { 0.07 } else { 0.015 };
        let share =
            (performance - pressure * period.winter() + 0.02 * rng.normal()).clamp(0.3, 1.0);
        let within = ((attendances as f64) * share).round() as i64;
        let admitted = match department {
            "Type 1" => {
                (attendances as f64 * rng.uniform(0.24, 0.31) * (1.0 + 0.05 * period.winter()))
                    .round() as i64
            }
            "Type 2" => (attendances as f64 * rng.uniform(0.0, 0.04)).round() as i64,
            _ => 0,
        };
        let pct = if attendances > 0 {
            format!("{:.2}", 100.0 * within as f64 / attendances as f64)
        } else {
            String::new()
        };
        csv_line(
            &mut out,
            &[
                &org.code,
                &org.name,
                org.region,
                department,
                &attendances.to_string(),
                &within.to_string(),
                &(attendances - within).to_string(),
                &maybe(&mut rng, 0.004, admitted.to_string()),
                &pct,
                &period.date,
            ],
        );
    }
    out
}

/// Treatment functions: code, name and relative size of the waiting list.
const TREATMENT_FUNCTIONS: [(&str, &str, f64); 21] = [
    ("C_100", "General Surgery", 1.2),
    ("C_101", "Urology", 0.8),
    ("C_110", "Trauma and Orthopaedic", 1.6),
    ("C_120", "Ear Nose and Throat", 1.0),
    ("C_130", "Ophthalmology", 1.4),
    ("C_140", "Oral Surgery", 0.6),
    ("C_150", "Neurosurgical", 0.3),
    ("C_160", "Plastic Surgery", 0.4),
    ("C_170", "Cardiothoracic Surgery", 0.2),
    ("C_300", "General Internal Medicine", 0.7),
    ("C_301", "Gastroenterology", 1.0),
    ("C_320", "Cardiology", 0.9),
    ("C_330", "Dermatology", 1.0),
    ("C_340", "Respiratory Medicine", 0.6),
    ("C_400", "Neurology", 0.6),
    ("C_410", "Rheumatology", 0.5),
    ("C_430", "Elderly Medicine", 0.3),
    ("C_502", "Gynaecology", 1.1),
    ("X02", "Other - Medical Services", 0.8),
    ("X03", "Other - Mental Health Services", 0.3),
    ("X05", "Other - Surgical Services", 0.7),
];

/// RTT: one row per provider and treatment function.
fn rtt_waiting_times(period: &Period, rows: usize) -> String {
    let trusts = orgs("trust", 400);
    let functions: Vec<_> = TREATMENT_FUNCTIONS.iter().collect();
    let mut key_rng = Rng::new(&["keys", "rtt_waiting_times"]);
    let chosen = select(&mut key_rng, trusts.len() * functions.len(), rows);
    let keys: Vec<_> = chosen
        .into_iter()
        .map(|i| {
            let (trust, function) = (&trusts[i / functions.len()], functions[i % functions.len()]);
            let size = key_rng.lognormal(2200.0, 0.8) * function.2;
            (
                trust,
                function,
                size,
                key_rng.uniform(0.45, 0.75),
                key_rng.uniform(0.0, 0.04),
            )
        })
        .collect();
    let mut rng = period.rng("rtt_waiting_times", rows);
    let mut out = String::with_capacity(rows * 100);
    csv_line(&mut out, &RTT_HEADER);
    // The national list grew through 2023 and eased slowly in 2024; long waits fell throughout.
    let trend = 1.0 + 0.006 * period.index.min(9.0) - 0.002 * (period.index - 9.0).max(0.0);
    let long_trend = (1.0 - 0.025 * period.index).max(0.3);
    for (trust, (code, name, _), size, within_share, long_share) in keys {
        let total = (size * trend * (1.0 + 0.03 * rng.normal()))
            .round()
            .max(0.0) as i64;
        let share = (within_share - 0.01 * period.winter() + 0.015 * rng.normal()).clamp(0.2, 0.99);
        let within = (total as f64 * share).round() as i64;
        let over_52 =
            ((total as f64) * long_share * long_trend * rng.uniform(0.8, 1.2)).round() as i64;
        let median = (4.0 + 14.0 * (1.0 - share) + rng.uniform(-1.0, 1.0)).max(1.0);
        let p92 = median * rng.uniform(2.4, 3.4);
        let (pct, median, p92) = if total > 0 {
            (
                format!("{:.2}", 100.0 * within as f64 / total as f64),
                format!("{median:.1}"),
                format!("{p92:.1}"),
            )
        } else {
            (String::new(), String::new(), String::new())
        };
        csv_line(
            &mut out,
            &[
                &period.date,
                &trust.code,
                &trust.name,
                code,
                name,
                &total.to_string(),
                &within.to_string(),
                &maybe(&mut rng, 0.003, over_52.to_string()),
                &pct,
                &maybe(&mut rng, 0.003, median),
                &p92,
            ],
        );
    }
    out
}

const MODES: [(&str, f64); 5] = [
    ("Face-to-Face", 0.66),
    ("Telephone", 0.28),
    ("Video Conference/Online", 0.012),
    ("Home Visit", 0.008),
    ("Unknown", 0.04),
];
const HCP_TYPES: [(&str, f64); 3] = [
    ("GP", 0.44),
    ("Other Practice staff", 0.51),
    ("Unknown", 0.05),
];
const BOOKING_TIMES: [(&str, f64); 8] = [
    ("Same Day", 0.44),
    ("1 Day", 0.08),
    ("2 to 7 Days", 0.19),
    ("8 to 14 Days", 0.12),
    ("15 to 21 Days", 0.07),
    ("22 to 28 Days", 0.05),
    ("More than 28 Days", 0.04),
    ("Unknown / Data Quality", 0.01),
];

/// GP appointments: one row per sub-ICB location, mode, staff type and time from booking.
fn gp_appointments(period: &Period, rows: usize) -> String {
    let icbs = orgs("icb", 42);
    let mut key_rng = Rng::new(&["keys", "gp_appointments"]);
    // Each ICB has two to four sub-ICB locations with codes like `14L`.
    let mut subs: Vec<(&Org, String, f64)> = Vec::new();
    let mut used = HashSet::new();
    for icb in &icbs {
        for _ in 0..(2 + key_rng.below(3)) {
            let code = loop {
                let code = format!("{:02}{}", key_rng.below(100), *key_rng.pick(ALNUM) as char);
                if used.insert(code.clone()) {
                    break code;
                }
            };
            subs.push((icb, code, key_rng.lognormal(180_000.0, 0.45)));
        }
    }
    let combos = MODES.len() * HCP_TYPES.len() * BOOKING_TIMES.len();
    let chosen = select(&mut key_rng, subs.len() * combos, rows);
    let mut rng = period.rng("gp_appointments", rows);
    let mut out = String::with_capacity(rows * 100);
    csv_line(&mut out, &GP_HEADER);
    // Fewer appointments in August and December, more in the autumn.
    let seasonal = match period.month {
        8 => 0.88,
        12 => 0.86,
        9..=11 => 1.08,
        _ => 1.0,
    };
    for index in chosen {
        let (icb, sub_code, volume) = &subs[index / combos];
        let combo = index % combos;
        let mode = MODES[combo / (HCP_TYPES.len() * BOOKING_TIMES.len())];
        let hcp = HCP_TYPES[(combo / BOOKING_TIMES.len()) % HCP_TYPES.len()];
        let booking = BOOKING_TIMES[combo % BOOKING_TIMES.len()];
        let expected =
            volume * mode.1 * hcp.1 * booking.1 * seasonal * (1.0 + 0.003 * period.index);
        let count = (expected * (1.0 + 0.05 * rng.normal())).round().max(0.0) as i64;
        // Did-not-attend rates rise with the wait and are low for same-day appointments.
        let dna_rate =
            (0.012 + 0.012 * (combo % BOOKING_TIMES.len()) as f64 + 0.005 * rng.normal())
                .clamp(0.0, 0.3);
        let dna = (count as f64 * dna_rate).round() as i64;
        let attended = if count > 0 {
            format!(
                "{:.2}",
                100.0 * (count - dna) as f64 * rng.uniform(0.96, 0.99) / count as f64
            )
        } else {
            String::new()
        };
        csv_line(
            &mut out,
            &[
                &period.date,
                &icb.code,
                &icb.name,
                sub_code,
                mode.0,
                hcp.0,
                booking.0,
                &count.to_string(),
                &maybe(&mut rng, 0.003, dna.to_string()),
                &maybe(&mut rng, 0.003, attended),
            ],
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csvscan;
    use crate::extract::{ExtractArgs, draft_manifest};
    use crate::manifest::ColumnType;

    #[test]
    fn output_is_deterministic_and_independent_of_the_range() {
        for dataset in DATASETS {
            assert_eq!(
                generate(dataset, 2024, 2, 300),
                generate(dataset, 2024, 2, 300)
            );
            assert_ne!(
                generate(dataset, 2024, 2, 300),
                generate(dataset, 2024, 3, 300)
            );
        }
    }

    #[test]
    fn every_file_has_the_requested_rows_and_a_mix_of_types() {
        for dataset in DATASETS {
            let csv = generate(dataset, 2023, 12, 1500);
            let scan = csvscan::scan(csv.as_bytes(), |_| {});
            assert_eq!(scan.rows, 1500, "{dataset}");
            assert!(scan.warnings.is_empty(), "{dataset}: {:?}", scan.warnings);
            assert_eq!(scan.header, header(dataset));
            let args = ExtractArgs {
                url: "file:///x.csv".into(),
                dataset: dataset.into(),
                month: "2023-12".into(),
                raw_out: "/x.csv".into(),
                out: "/x.yaml".into(),
            };
            let manifest = draft_manifest(&args, csv.as_bytes());
            let kinds: HashSet<ColumnType> = manifest.columns.iter().map(|c| c.kind).collect();
            for kind in [
                ColumnType::Integer,
                ColumnType::Float,
                ColumnType::Date,
                ColumnType::String,
            ] {
                assert!(kinds.contains(&kind), "{dataset} lacks {kind}");
            }
            assert!(
                manifest.columns.iter().any(|c| c.null_count > Some(0)),
                "{dataset} has no empty cells"
            );
            assert!(manifest.to_yaml().unwrap().len() > 1024);
        }
    }

    fn example_dir(sub: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(sub)
    }

    #[test]
    fn the_committed_sample_data_is_what_the_generator_writes() {
        let months = months_in(parse_months(&format!("{DEFAULT_FROM}..{DEFAULT_TO}")).unwrap());
        assert_eq!(months.len(), 24);
        for dataset in DATASETS {
            for &(year, month) in &months {
                let path = month_path(&example_dir("data"), dataset, year, month);
                assert!(
                    path.is_file(),
                    "`{}` is missing; run datawarp-gen",
                    path.display()
                );
            }
            // Comparing two months per dataset catches drift without regenerating everything.
            for (year, month) in [months[0], months[months.len() - 1]] {
                let path = month_path(&example_dir("data"), dataset, year, month);
                let committed = std::fs::read_to_string(&path).unwrap();
                assert!(
                    committed == generate(dataset, year, month, DEFAULT_ROWS),
                    "`{}` differs from the generator's output; run datawarp-gen and commit the result",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn every_reference_describes_exactly_the_generated_columns() {
        for dataset in DATASETS {
            let path = example_dir("reference").join(format!("{dataset}.yaml"));
            let reference = crate::enrich::Reference::read(&path).unwrap();
            assert_eq!(reference.dataset, dataset);
            let mut described: Vec<&str> = reference.columns.keys().map(String::as_str).collect();
            let mut generated = header(dataset).to_vec();
            described.sort_unstable();
            generated.sort_unstable();
            assert_eq!(described, generated, "`{}`", path.display());
        }
    }

    #[test]
    fn month_ranges_parse_and_expand() {
        let range = parse_months("2023-11..2024-02").unwrap();
        assert_eq!(
            months_in(range),
            [(2023, 11), (2023, 12), (2024, 1), (2024, 2)]
        );
        for bad in ["2023-01", "2024-01..2023-01", "2023-13..2024-01", "a..b"] {
            assert!(parse_months(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn selection_picks_exactly_n_in_order() {
        let mut rng = Rng::new(&["t"]);
        let picked = select(&mut rng, 100, 30);
        assert_eq!(picked.len(), 30);
        assert!(picked.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(select(&mut rng, 5, 10), [0, 1, 2, 3, 4]);
    }
}

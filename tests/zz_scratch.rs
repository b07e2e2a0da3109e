use token_sidecar::differential::{Case, Rig};

#[tokio::test(start_paused = true)]
async fn scratch() {
    let rig = Rig::start().await;
    let dir = std::env::var("CASES").unwrap();
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        let case = Case::parse(&std::fs::read(&p).unwrap());
        let t0 = tokio::time::Instant::now();
        let r = rig.check(&case).await;
        eprintln!("== {} ({:?} virtual)", p.display(), t0.elapsed());
        match r {
            Ok(v) => eprintln!("{v:?}"),
            Err(d) => eprintln!("{d}"),
        }
    }
}

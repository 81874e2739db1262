//! Hostile and careless command lines (issue 12): one test per defect class.
//! Each bad input exits non-zero with one line naming the cause, and leaves
//! the previous output intact and no staging entries behind; outputs are
//! all or nothing, also under kill -9 and with two writers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ndarray::{Array1, Array2, Array3};
use ndarray_npy::{ReadNpyExt, WriteNpyExt};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nnlin"))
}
fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("fixtures")
}
fn iris(name: &str) -> String {
    root().join("iris").join(name).display().to_string()
}
fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}
fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// No staging or set-aside entries of an output are left in `dir`.
fn no_leftovers(dir: &Path) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.contains(".nnlin-new-") || n.contains(".nnlin-old-") || n.contains(".nnlin-spool-")
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Fails with one line containing `needle` (and no raw control characters).
fn one_line(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure; stderr: {err}");
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "expected one line, got: {err}");
    assert!(err.contains(needle), "`{needle}` not in: {err}");
    assert!(!err.trim_end().chars().any(char::is_control), "control characters in: {err:?}");
}

/// `decompose` of the first 3 iris flowers against the labels `y`.
fn decompose(y: &Path, extra: &[&str]) -> Output {
    let (m, x) = (iris("relu.onnx"), iris("inputs.npy"));
    let mut args = vec!["decompose", &m, "--data", &x, "--labels", s(y), "--limit", "3"];
    args.extend_from_slice(extra);
    run(&args)
}

/// Runs a good explain into `out` and returns its W.npy.
fn good_run(out: &Path) -> Vec<u8> {
    let o = run(&["explain", &iris("relu.onnx"), "--input", &iris("inputs.npy"), "--out", s(out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out.join("W.npy")).unwrap()
}

/// Runs `args` (an explain into `out`), expects `needle`, and checks the
/// previous result in `out` is untouched.
fn refused_keeps_previous(args: &[&str], out: &Path, needle: &str) {
    let before = good_run(out);
    let o = run(args);
    one_line(&o, needle);
    assert_eq!(std::fs::read(out.join("W.npy")).unwrap(), before);
    no_leftovers(out.parent().unwrap());
}

#[test]
fn npy_headers_that_claim_more_than_the_file_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    // a header claiming 10^12 float64 values, no data
    let mut header =
        b"{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000, 4), }".to_vec();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(b' ');
    }
    header.push(b'\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(&header);
    let x = tmp.path().join("big.npy");
    std::fs::write(&x, &bytes).unwrap();
    let args = ["explain", &iris("relu.onnx"), "--input", s(&x), "--out", s(&out)];
    refused_keeps_previous(&args, &out, "is truncated: its header states shape [1000000000000, 4]");
    // truncated data get the real reason
    let mut good = vec![];
    Array2::<f64>::zeros((3, 4)).write_npy(&mut good).unwrap();
    good.truncate(good.len() - 5);
    std::fs::write(&x, &good).unwrap();
    refused_keeps_previous(&args, &out, "is truncated");
    // an object array is never unpickled
    let mut obj = good.clone();
    let at = obj.windows(3).position(|w| w == b"<f8").unwrap();
    obj[at..at + 3].copy_from_slice(b"|O8");
    std::fs::write(&x, &obj).unwrap();
    refused_keeps_previous(&args, &out, "never unpickles");
}

#[test]
fn gzip_bombs_behind_idx_headers_stop_at_the_stated_size() {
    let tmp = tempfile::tempdir().unwrap();
    // header: 2 rows of 4 bytes, then 512 MiB of zeros
    let path = tmp.path().join("bomb-idx3-ubyte.gz");
    let f = std::fs::File::create(&path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    gz.write_all(&[0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 4]).unwrap();
    gz.write_all(&[10, 20, 30, 40, 50, 60, 70, 80]).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..512 {
        gz.write_all(&zeros).unwrap();
    }
    gz.finish().unwrap();
    // a 4-input model reads the 2 instances; under a 768 MiB address-space
    // limit a full decompression (512 MiB, grown by doubling) could not be
    // held
    let model = iris("relu.onnx");
    let out = tmp.path().join("res");
    let script = format!(
        "ulimit -v 786432; MALLOC_ARENA_MAX=2 exec '{}' explain '{model}' --input '{}' --out '{}' --threads 1",
        env!("CARGO_BIN_EXE_nnlin"),
        path.display(),
        out.display()
    );
    let o = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = Array3::<f64>::read_npy(std::fs::File::open(out.join("W.npy")).unwrap()).unwrap();
    assert_eq!(w.dim().0, 2);
    // a header stating more than the file holds is truncated data
    let short = tmp.path().join("short-idx3-ubyte");
    std::fs::write(&short, [0, 0, 8, 2, 0, 0, 0, 9, 0, 0, 0, 4, 1, 2, 3]).unwrap();
    let args = ["explain", &model, "--input", s(&short), "--out", s(&out)];
    refused_keeps_previous(&args, &out, "truncated IDX data");
}

#[test]
fn size_options_have_upper_bounds() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let x = iris("inputs.npy");
    let m = iris("relu.onnx");
    refused_keeps_previous(
        &["explain", &m, "--input", &x, "--out", s(&out), "--threads", "1000000"],
        &out,
        "--threads 1000000 is above the limit of 1024",
    );
    refused_keeps_previous(
        &["explain", &m, "--input", &x, "--out", s(&out), "--max-memory", "lots"],
        &out,
        "bad --max-memory `lots`",
    );
    // the dense baseline and W itself are checked against the budget
    refused_keeps_previous(
        &[
            "explain",
            &m,
            "--input",
            &x,
            "--out",
            s(&out),
            "--strategy",
            "dense",
            "--max-memory",
            "4K",
        ],
        &out,
        "dense baseline needs",
    );
    refused_keeps_previous(
        &["explain", &m, "--input", &x, "--out", s(&out), "--max-memory", "2K"],
        &out,
        "above the memory budget",
    );
    let neu = tmp.path().join("neu");
    let o = run(&["neurons", &m, "--input", &x, "--out", s(&neu), "--top", "99999"]);
    one_line(&o, "--top must be between 1 and 64");
    assert!(!neu.exists());
    let reg = tmp.path().join("reg");
    let o = run(&["region", &m, "--input", &x, "--out", s(&reg), "--verify", "1000000000"]);
    one_line(&o, "--verify 1000000000 is above the limit");
    assert!(!reg.exists());
    let o = run(&["plan", &m, "--input", &x, "--rows", "top99999"]);
    one_line(&o, "top99999: the model has only 3 outputs");
    let o = run(&["plan", &m, "--input", &x, "--rows", "0,9"]);
    one_line(&o, "row 9 out of range");
}

#[test]
fn images_must_match_the_models_channels() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let lenet = root().join("cnn/lenet5.onnx");
    for (name, color) in
        [("rgb.png", image::ColorType::Rgb8), ("rgba.png", image::ColorType::Rgba8)]
    {
        let img = tmp.path().join(name);
        let n = 28 * 28 * usize::from(color.channel_count());
        image::save_buffer(&img, &vec![128u8; n], 28, 28, color).unwrap();
        let o = run(&["explain", s(&lenet), "--input", s(&img), "--out", s(&out)]);
        one_line(&o, "but the model takes grayscale (1 channel)");
        assert!(!out.exists());
    }
}

#[test]
fn labels_must_be_class_indices() {
    let tmp = tempfile::tempdir().unwrap();
    let j = tmp.path().join("t.json");
    for (v, needle) in [
        (f64::NAN, "label NaN at index 1"),
        (1e300, "label 1e300 at index 1"),
        (1.5, "label 1.5"),
        (-1.0, "label -1"),
    ] {
        let y = tmp.path().join("y.npy");
        Array1::from(vec![0.0, v, 2.0]).write_npy(std::fs::File::create(&y).unwrap()).unwrap();
        one_line(&decompose(&y, &["--json", s(&j)]), needle);
        assert!(!j.exists());
    }
}

#[test]
fn overflowing_ensembles_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let m = iris("relu.onnx");
    refused_keeps_previous(
        &[
            "explain",
            &m,
            &m,
            "--weights",
            "1e308,1e308",
            "--input",
            &iris("inputs.npy"),
            "--out",
            s(&out),
        ],
        &out,
        "non-finite",
    );
}

#[test]
fn spools_of_ended_processes_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    // W.npy half written by a process that has ended (no such pid)
    let stale = tmp.path().join(".res.nnlin-spool-W.npy-4194305");
    std::fs::write(&stale, b"partial").unwrap();
    let w = good_run(&out);
    assert!(!stale.exists());
    no_leftovers(tmp.path());
    // the streamed W.npy is a well-formed array
    let w = Array3::<f64>::read_npy(&w[..]).unwrap();
    assert_eq!(w.dim().2, 4);
}

#[test]
fn a_box_that_excludes_x_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("reg");
    let o = run(&[
        "region",
        &iris("relu.onnx"),
        "--input",
        &iris("inputs.npy"),
        "--box",
        "10,11",
        "--out",
        s(&out),
    ]);
    one_line(&o, "lies outside --box 10,11");
    assert!(!out.exists());
    let o = run(&[
        "region",
        &iris("relu.onnx"),
        "--input",
        &iris("inputs.npy"),
        "--box",
        "0,nan",
        "--out",
        s(&out),
    ]);
    one_line(&o, "--box: `nan` is not finite");
}

#[test]
fn control_characters_in_model_names_are_escaped() {
    use nnlin_onnx::proto;
    use prost::Message;
    let tmp = tempfile::tempdir().unwrap();
    let mut m =
        proto::ModelProto::decode(std::fs::read(iris("relu.onnx")).unwrap().as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    g.node[0].op_type = Some("Frobnicate".into());
    g.node[0].name = Some("evil\r\x1b[31mnode\x07".into());
    let path = tmp.path().join("evil.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    let out = tmp.path().join("res");
    let o = run(&["explain", s(&path), "--input", &iris("inputs.npy"), "--out", s(&out)]);
    one_line(&o, "evil\\r\\u{1b}[31mnode\\u{7}");
}

#[test]
fn hostile_models_get_one_line() {
    use nnlin_onnx::proto;
    use prost::Message;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let mut m =
        proto::ModelProto::decode(std::fs::read(iris("relu.onnx")).unwrap().as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    // an initializer whose element count wraps around usize
    g.initializer[0].dims = vec![1 << 32, 1 << 32];
    let path = tmp.path().join("wrap.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    let args = ["explain", s(&path), "--input", &iris("inputs.npy"), "--out", s(&out)];
    refused_keeps_previous(&args, &out, "more elements than memory can hold");
}

#[test]
fn output_folder_is_replaced_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let lenet = root().join("cnn/lenet5.onnx").display().to_string();
    let digits = root().join("data/mnist/t10k-images-idx3-ubyte.gz[0..2]").display().to_string();
    let o = run(&[
        "explain",
        &lenet,
        "--input",
        &digits,
        "--out",
        s(&out),
        "--rows",
        "top1",
        "--heatmap",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("heatmaps/instance_1.png").exists());
    let digit = root().join("data/mnist/t10k-images-idx3-ubyte.gz[5]").display().to_string();
    let o = run(&["explain", &lenet, "--input", &digit, "--out", s(&out), "--rows", "top1"]);
    assert!(o.status.success());
    // no heat maps of the earlier run beside the new result
    assert!(!out.join("heatmaps").exists());
    no_leftovers(tmp.path());
    // stale staging folders of dead processes are removed by the next run
    let stale = tmp.path().join(".res.nnlin-new-999999999");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("W.npy"), vec![0u8; 4096]).unwrap();
    good_run(&out);
    assert!(!stale.exists());
    no_leftovers(tmp.path());
}

#[test]
fn several_targets_commit_all_or_none() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("reg");
    // the JSON target cannot be written: the folder must not appear either
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let json = blocker.join("r.json");
    let o = run(&[
        "region",
        &iris("relu.onnx"),
        "--input",
        &iris("inputs.npy"),
        "--out",
        s(&out),
        "--json",
        s(&json),
    ]);
    one_line(&o, "cannot");
    assert!(!out.exists());
    no_leftovers(tmp.path());
    // decompose: the markdown target is a directory, so the JSON is not written
    let j = tmp.path().join("t.json");
    let md = tmp.path().join("t.md");
    std::fs::create_dir(&md).unwrap();
    let y = tmp.path().join("y.npy");
    Array1::from(vec![0i64, 1, 2]).write_npy(std::fs::File::create(&y).unwrap()).unwrap();
    let o = decompose(&y, &["--json", s(&j), "--markdown", s(&md)]);
    one_line(&o, "is a directory");
    assert!(!j.exists());
    no_leftovers(tmp.path());
}

/// `summary.json`, `W.npy` and `b.npy` of one folder describe the same run.
fn consistent(out: &Path) -> Option<usize> {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).ok()?).unwrap();
    let n = summary["instances_count"].as_u64().unwrap() as usize;
    let w = Array3::<f64>::read_npy(std::fs::File::open(out.join("W.npy")).unwrap()).unwrap();
    let b = Array2::<f64>::read_npy(std::fs::File::open(out.join("b.npy")).unwrap()).unwrap();
    assert_eq!(w.dim().0, n, "W from another run than summary.json");
    assert_eq!(b.dim().0, n, "b from another run than summary.json");
    Some(n)
}

#[test]
fn a_killed_run_leaves_the_old_or_the_new_result() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let lenet = root().join("cnn/lenet5.onnx").display().to_string();
    let few = root().join("data/mnist/t10k-images-idx3-ubyte.gz[0..3]").display().to_string();
    let many = root().join("data/mnist/t10k-images-idx3-ubyte.gz[0..400]").display().to_string();
    assert!(run(&["explain", &lenet, "--input", &few, "--out", s(&out)]).status.success());
    assert_eq!(consistent(&out), Some(3));
    let mut seen_new = false;
    for k in 0..12u64 {
        let mut child = bin()
            .args(["explain", &lenet, "--input", &many, "--out", s(&out), "--heatmap"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(150 + 120 * k));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let n = consistent(&out).expect("the output folder vanished");
        assert!(n == 3 || n == 400, "a mix: {n} instances");
        seen_new |= n == 400;
    }
    // the next run cleans whatever the killed ones left
    assert!(run(&["explain", &lenet, "--input", &few, "--out", s(&out)]).status.success());
    assert_eq!(consistent(&out), Some(3));
    no_leftovers(tmp.path());
    let _ = seen_new;
}

#[test]
fn two_writers_to_one_folder_do_not_mix() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let lenet = root().join("cnn/lenet5.onnx").display().to_string();
    let a = root().join("data/mnist/t10k-images-idx3-ubyte.gz[0..40]").display().to_string();
    let b = root().join("data/mnist/t10k-images-idx3-ubyte.gz[0..7]").display().to_string();
    for _ in 0..3 {
        let spawn = |x: &str| {
            bin()
                .args(["explain", &lenet, "--input", x, "--out", s(&out)])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (ca, cb) = (spawn(&a), spawn(&b));
        let (oa, ob) = (ca.wait_with_output().unwrap(), cb.wait_with_output().unwrap());
        assert!(oa.status.success() && ob.status.success());
        let n = consistent(&out).unwrap();
        assert!(n == 40 || n == 7);
    }
    no_leftovers(tmp.path());
}

/// A reader that closes the pipe early (`nnlin inspect m | head`) ends the
/// command quietly with 141 (128 + SIGPIPE), not with an internal error.
#[test]
fn a_closed_stdout_ends_quietly() {
    let mut child = bin()
        .args(["inspect", &root().join("cnn/lenet5.onnx").to_string_lossy()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // close the read end before the model is loaded and the first line written
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(141), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

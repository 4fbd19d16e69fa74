"""Defaults shared by every config (plain data; imports only kdprune_jax.config_helpers).

Other configs load this file with `kdprune_jax.config_helpers` (``base_config()``, or
``load_config_module("base.py")`` for `optim` too; configs/ is not a package) and override
fields. It takes no ``:arg``.
Durations end in _epochs / _steps; every field is overridable on the command line, e.g.
``--config.kd.alpha=0.5``.
"""

import ml_collections

from kdprune_jax.config_helpers import parse_config_arg


def optim(num_epochs, batch_size, learning_rate, weight_decay=5e-4, schedule="cosine"):
    return ml_collections.ConfigDict(dict(
        num_epochs=num_epochs,
        batch_size=batch_size,  # GLOBAL batch: a multiple of the device count
        learning_rate=learning_rate,
        momentum=0.9,
        nesterov=True,
        weight_decay=weight_decay,
        schedule=schedule,  # cosine | step | constant
        warmup_epochs=0.0,
        step_boundaries_epochs=(),  # for schedule=step
        step_decay=0.1,
    ))


def get_config(arg: str = ""):
    parse_config_arg(arg)  # takes no arg
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict(dict(
        source="digits",  # digits | image_folder | tfds | arrays
        name="",  # tfds dataset name (source=tfds)
        path="",  # image folder / .tar.gz / .npz (source=image_folder | arrays)
        data_dir="",  # tfds data dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
        train_split="train",
        eval_split="test",  # final reporting only; never used for selection or tuning
        image_size=32,  # output size of the imagenet augmentation
        augment="cifar",  # none | cifar | imagenet
        mean=(125.3, 123.0, 113.9),  # per-channel, in [0, 255] units
        std=(63.0, 62.1, 66.7),
        val_fraction=0.05,  # stratified validation split carved from train (METHOD §1)
        val_seed=0,
        max_per_class=0,  # >0: only the first N examples of each class (smoke runs)
        label_noise=0.0,  # fraction of train labels flipped symmetrically
        label_noise_seed=0,
        num_workers=0,  # grain worker processes for decode/augment (0 = in-process)
        prefetch=2,  # batches the host reads ahead
    ))

    c.teacher = ml_collections.ConfigDict(dict(
        model="cifar_resnet56",
        width=1.0,
        init="",  # "" = train on the pool; a kdprune_jax teacher/ dir; or a torchvision .pt
        optim=optim(num_epochs=200, batch_size=128, learning_rate=0.1),
    ))
    c.student = ml_collections.ConfigDict(dict(
        model="cifar_resnet20",
        width=1.0,
        equal_steps=False,  # True: as many optimizer steps as full-data training
        optim=optim(num_epochs=200, batch_size=128, learning_rate=0.1),
    ))
    # METHOD §2; CIFAR defaults tau=4, alpha=0.9. alpha=0 trains on labels only (no teacher).
    # teacher_views = V > 0: cached-teacher mode. The teacher's logits for V fixed augmented
    # views of each kept example are computed once (DIR/teacher_views/, float16) and the
    # student trains on those views without running the teacher: pays off when the student
    # trains for more than V epochs (benchmarks/cached_teacher.py). 0 = live teacher.
    # alpha: a number in [0, 1] or "auto": the weight for prune.keep_fraction read from the
    # rule file kd.alpha_rule (fitted on validation accuracy by the study report; README
    # "Results"). An object-typed field, so that one field takes both.
    c.kd = ml_collections.ConfigDict(dict(
        alpha=ml_collections.FieldReference(0.9, field_type=object), temperature=4.0,
        teacher_views=0, alpha_rule=""))

    c.prune = ml_collections.ConfigDict(dict(
        # random | el2n | teacher_el2n | grand | grand_last_layer | forgetting | entropy |
        # margin | moderate | influence | self_influence   (METHOD.md §3-4) | ifbeta (§5)
        method="random",
        keep_fraction=0.5,  # fraction of the train pool KEPT, in (0, 1]
        direction="auto",  # auto (= METHOD.md's kept end) | highest | lowest | middle
        rule="keep_end",  # keep_end | ccs (coverage-centric: drop hardest, sample strata)
        ccs_hard_cutoff=0.1,  # CCS: fraction of the hardest examples dropped
        ccs_strata=50,
        balanced=True,  # exact per-class counts; False = one global ranking
        seed=0,  # draws random subsets and breaks score ties
        scores_file="",  # use precomputed scores (.npz from another run) instead
    ))
    # Proxy models for el2n / grand / grand_last_layer / forgetting (Paul et al. 2021):
    # K student-architecture models trained with CE on the full pool for a short schedule.
    # Their training time is part of the method's pruning cost (reported in results.json).
    c.proxy = ml_collections.ConfigDict(dict(
        num_models=4,  # K (the paper uses 10); forgetting and influence use one model
        num_epochs=10,  # E (the paper uses ~20 of 200)
        model="",  # "" = the student's architecture
    ))
    # Influence functions (METHOD.md §4).
    c.influence = ml_collections.ConfigDict(dict(
        scope="head",  # head (linear head on teacher features) | last_layer | full
        model="teacher",  # teacher | proxy: whose parameters (scopes last_layer, full)
        loss="kd",  # kd (KD-aligned, teacher as target) | ce
        kd_weight=0.9,  # lam of the KD-aligned loss
        temperature=4.0,
        l2=1e-4,  # mu: L2 of the refit head (scope head)
        head_max_iters=500,  # L-BFGS iterations for the head fit
        # exact | cg | lissa | diag_fisher (scopes head, last_layer) | kfac | ekfac (scopes
        # last_layer, full: Kronecker-factored Fisher, factors saved in DIR/influence/)
        solver="cg",
        damping=1e-3,  # added to H (or to the K-FAC eigenvalues: kfac_damping_mode)
        max_iters=200,
        tol=1e-5,
        lissa_scale=10.0,
        hessian_examples=2000,  # scope full: pool examples defining the Hessian (0 = all)
        kfac_fisher="true",  # true (sampled labels) | empirical | expected (Gauss-Newton)
        kfac_damping_mode="absolute",  # absolute | relative (damping x mean eigenvalue)
        kfac_chunk_size=128,  # rows per K-FAC pass (memory only)
    ))
    # IF-Beta (METHOD.md §5, our reconstruction of paper B): the proxy problem on teacher
    # features and its influence ranks.
    c.ifbeta = ml_collections.ConfigDict(dict(
        head="linear",  # linear (convex) | mlp (one hidden layer; needs damping > 0)
        mlp_hidden=128,
        kd_weight=0.9,  # lam of the KD-aligned proxy loss (keep < 1: see METHOD §5.8)
        temperature=4.0,
        l2=1e-4,  # mu
        influence_solver="cg",  # exact | cg | diag_fisher (the influence ranks u)
        damping=1e-3,
        val2_fraction=0.5,  # share of the validation split used for early stopping (V2)
        feature_dtype="float32",  # float32 | float16 | bfloat16 storage of cached features
        features_dir="",  # reuse features/ from another run (must match teacher and data)
    ))
    # The Beta policy and its outer optimization.
    c.policy = ml_collections.ConfigDict(dict(
        method="implicit",  # implicit (IFT hypergradient) | reinforce | grid
        # The outer objective on V1/V2: kd (the proxy's KD-aligned loss, weight
        # ifbeta.kd_weight) | ce (cross-entropy on the validation labels)
        outer_loss="kd",
        learning_rate=0.05,  # Adam on (a~, b~)
        max_steps=200,
        patience=20,  # early stopping on V2
        init_a=1.0,
        init_b=1.0,  # Beta(1, 1) = random pruning
        inner_max_iters=200,  # L-BFGS iterations of the inner head fit
        inner_tol=1e-5,
        cg_max_iters=300,  # the head's Hessian is ill-conditioned when mu is small
        cg_tol=1e-5,
        damping=0.0,
        warm_start=True,  # inner solve starts from the previous step's theta*
        cg_warm_start=True,  # hypergradient CG starts from the previous step's solution
        # Kronecker preconditioning of the head's L-BFGS and CG solves: auto (kronecker for the
        # linear head, none for mlp) | kronecker | none
        preconditioner="auto",
        check_grad=False,  # compare the implicit gradient with finite differences at init
        reinforce_samples=8,
        grid_values=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0),  # a and b values of the grid search
    ))
    c.score = ml_collections.ConfigDict(dict(
        batch_size=256,  # global batch of the scoring passes (multiple of device count)
        # grand: examples PER DEVICE per vmapped per-example-gradient chunk (chunks unrolled
        # in the program; 64 is 1.3x faster than 0 on a CPU, benchmarks/grand.py); memory:
        # chunk x #params gradient floats per device; 0 = each device's whole block at once.
        grand_chunk_size=64,
    ))
    c.eval = ml_collections.ConfigDict(dict(batch_size=256))
    # Mixed precision for every trained model (teacher, proxies, student): convolutions and
    # activations in bfloat16; params, BatchNorm statistics, loss and optimizer in float32.
    # Scoring, influence HVPs and evaluation always run in float32. float32 | bfloat16.
    c.compute_dtype = "float32"
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    return c

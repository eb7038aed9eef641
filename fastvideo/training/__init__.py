"""Training the small demo model (issue 17): procedural shapes videos (`shapes_data`), a
prompt-adherence scorer (`scorer`), the model's sizes (`tiny_config`), its Diffusers folder
(`build_model`) and the two-stage training loop (`train`)."""

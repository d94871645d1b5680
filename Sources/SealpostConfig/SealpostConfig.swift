// SealpostConfig

// StageProtocol
